"""Block manager: exact block ids, ref counts, prefix hits, eviction order, no leaks."""

from __future__ import annotations

import random

from dist_engine.kv_cache.block_manager import BlockManager, chain_hash, namespace_digest


def test_grow_and_free_exact_ids():
    bm = BlockManager(num_blocks=6, block_size=4)
    t: list[int] = []
    assert bm.grow(t, 5) and t == [0, 1]
    assert bm.grow(t, 8) and t == [0, 1]
    assert bm.grow(t, 9) and t == [0, 1, 2]
    assert bm.num_free == 3
    u: list[int] = []
    assert not bm.grow(u, 17) and u == []  # all or nothing
    bm.free_blocks(t)
    assert t == [] and bm.num_free == 6
    # freed tail-first: next allocations reuse 3, 4, 5 (never used) then 2, 1, 0
    assert bm.grow(u, 24) and u == [3, 4, 5, 2, 1, 0]


def test_prefix_hits_share_blocks_and_keep_one_token_uncached():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10, 22))  # 12 tokens = 3 full blocks
    a: list[int] = []
    ha: list[int] = []
    bm.grow(a, len(tokens))
    bm.commit(a, ha, tokens, len(tokens))
    assert len(ha) == 3
    hits, hashes = bm.match_prefix(tokens)  # same 12 tokens: last block must be recomputed
    assert hits == a[:2] and hashes == ha[:2]
    assert [bm.blocks[b].ref_count for b in a] == [2, 2, 1]
    hits2, _ = bm.match_prefix(tokens[:8] + [99, 98, 97, 96, 95])  # diverges in block 2
    assert hits2 == a[:2]
    assert bm.match_prefix([5] + tokens[1:])[0] == []  # first block differs: nothing shared
    for h in (hits, hits2):
        bm.free_blocks(list(h))
    a_ids = list(a)
    bm.free_blocks(a)
    assert bm.num_free == 8
    # cached content survives in free blocks until they are reused
    again, _ = bm.match_prefix(tokens)
    assert again == a_ids[:2]
    bm.free_blocks(again)
    assert bm.prefix_hit_tokens >= 16


def test_salted_blocks_are_shared_only_under_the_same_salt():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10, 22))
    a: list[int] = []
    ha: list[int] = []
    bm.grow(a, len(tokens))
    tenant = namespace_digest("tenant-a")
    bm.commit(a, ha, tokens, len(tokens), root=tenant)
    assert bm.match_prefix(tokens) == ([], [])  # unsalted lookups do not see them
    assert bm.match_prefix(tokens, namespace_digest("tenant-b")) == ([], [])
    assert bm.match_prefix(tokens, namespace_digest("tenant-a", "without-mtp-cache")) == ([], [])
    hits, _ = bm.match_prefix(tokens, root=namespace_digest("tenant-a"))
    assert hits == a[:2]
    bm.free_blocks(hits)
    bm.free_blocks(a)
    assert bm.num_free == 8


def test_block_keys_are_sha256_of_parent_and_token_ids():
    """The key is a collision-resistant digest of the whole chain, not Python's hash(): equal
    only for equal (namespace, tokens), and Python's hash randomisation does not change it."""
    import hashlib
    import struct

    root = namespace_digest()
    d = chain_hash(root, [1, 2, 3, 4])
    assert d == hashlib.sha256(root + struct.pack("<4q", 1, 2, 3, 4)).digest() and len(d) == 32
    assert chain_hash(d, [5, 6]) != chain_hash(chain_hash(root, [1, 2, 3, 5]), [5, 6])
    # key boundaries cannot be shifted: ("ab", None) vs ("a", "b") differ
    assert namespace_digest("ab", None) != namespace_digest("a", "b") != namespace_digest("a", None, "b")
    assert namespace_digest(None) != namespace_digest("") != namespace_digest()


def test_eviction_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    seqs = []
    for base in (0, 100):
        t, h = [], []
        toks = [base, base + 1, base + 2, base + 3]
        bm.grow(t, 4)
        bm.commit(t, h, toks, 4)
        seqs.append((t, toks))
    first_blocks = list(seqs[0][0])
    bm.free_blocks(seqs[0][0])  # freed first -> evicted first
    bm.free_blocks(seqs[1][0])
    x: list[int] = []
    bm.grow(x, 4)  # takes two blocks of the first sequence
    assert set(x) == set(first_blocks)
    assert bm.match_prefix([100, 101, 102, 103, 0])[0] != []  # second one still cached
    assert bm.match_prefix([0, 1, 2, 3, 0])[0] == []  # first one evicted


def test_random_mix_returns_all_blocks():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=4)
    live: list[tuple[list[int], list[int], list[int]]] = []
    for _ in range(500):
        if live and rng.random() < 0.4:
            t, h, toks = live.pop(rng.randrange(len(live)))
            bm.free_blocks(t)
            continue
        toks = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
        hits, hashes = bm.match_prefix(toks)
        t, h = list(hits), list(hashes)
        if bm.grow(t, len(toks)):
            bm.commit(t, h, toks, len(toks))
            live.append((t, h, toks))
        else:
            bm.free_blocks(t)
    for t, _, _ in live:
        bm.free_blocks(t)
    assert bm.num_free == 40
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_scheduler_reserves_lookahead_slots_for_drafts():
    from dist_engine.config import SchedulerConfig
    from dist_engine.engine.outputs import RequestMetrics
    from dist_engine.engine.sampling_params import SamplingParams
    from dist_engine.engine.scheduler import Scheduler
    from dist_engine.engine.sequence import Sequence

    bm = BlockManager(num_blocks=8, block_size=4)
    sch = Scheduler(SchedulerConfig(max_model_len=32, num_lookahead_slots=3), bm)
    seq = Sequence(0, "a", 0, [1, 2, 3, 4, 5], SamplingParams(), 0, None, RequestMetrics(0.0))
    sch.add(seq)
    (s,) = sch.schedule()
    assert s.num_new == 5 and len(seq.block_table) == 2  # 5 tokens + 3 draft slots = 8
    seq.num_computed = 5
    seq.output_token_ids.append(9)
    sch.schedule()
    assert len(seq.block_table) == 3  # 6 + 3 = 9 slots
    chunked = Scheduler(SchedulerConfig(max_model_len=32, max_num_batched_tokens=2,
                                        num_lookahead_slots=3), BlockManager(8, 4))
    other = Sequence(1, "b", 0, [1, 2, 3, 4, 5], SamplingParams(), 0, None, RequestMetrics(0.0))
    chunked.add(other)
    chunked.schedule()
    assert len(other.block_table) == 1  # a prefill chunk that does not sample needs no drafts
    sch.finish(seq)
    assert bm.num_free == 8
