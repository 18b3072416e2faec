"""Cache kinds: sliding-window blocks given back, the state bookkeeping's exact behaviour, the
budget split and the start-up figures against what was allocated."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import hf_greedy
from dist_engine import LLM, SamplingParams
from dist_engine.kv_cache.kinds import CacheLayout, PagedKV, RecurrentState
from dist_engine.kv_cache.state_slots import ChunkGrid, StateCheckpoints, StateSlots
from dist_engine.worker.caches import plan_layout


def test_sliding_window_blocks_behind_the_window_are_freed(tiny_models):
    """Mistral's tiny window is 12 tokens: with 8 blocks of 4 tokens (32 slots) a 60-token
    sequence only fits because blocks behind the window go back, and it still generates what
    transformers does."""
    path = tiny_models("mistral")
    prompt = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4]
    expected = hf_greedy(path, prompt, 40)
    with LLM(path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=8, block_size=4,
             max_num_batched_tokens=8) as llm:
        eng = llm.engine
        eng.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        held = []
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    got = out.outputs[0].token_ids
            held.append(eng.blocks.num_blocks - eng.blocks.num_free)
        assert got == expected
        assert max(held) <= 6 < 60 // 4  # window (12) + a chunk (8) + a partial block, not 15
        assert eng.blocks.num_free == 8


def test_state_slots_and_checkpoints_bookkeeping():
    slots = StateSlots(2)
    a, b = slots.take(), slots.take()
    assert (a, b) == (0, 1) and slots.take() is None
    slots.free(a)
    with pytest.raises(RuntimeError):
        slots.free(a)
    ck = StateCheckpoints(2, 512)
    s0, s1 = ck.reserve(), ck.reserve()
    assert ck.reserve() is None  # both busy (being saved)
    ck.commit(s0, b"d0")
    ck.commit(s1, b"d1")
    assert ck.find(b"d0") == s0  # now d1 is the least recently used
    s2 = ck.reserve()
    assert s2 == s1 and ck.find(b"d1") is None and ck.find(b"d0") == s0
    ck.release(s2)  # a save that never happened
    assert ck.num_cached == 1 and ck.reserve() == s2


def test_chunk_grid_ends_prefill_chunks_on_the_delta_rule_grid_and_checkpoints():
    g = ChunkGrid(512)
    assert g.chunk_end(0, 500, 2000) == 448  # on the 64-token grid
    assert g.chunk_end(448, 448 + 512, 2000) == 512  # never past a checkpoint position
    assert g.chunk_end(512, 1024, 2000, stops=(640,)) == 640  # nor past a fork point
    assert g.chunk_end(1984, 2100, 2000) == 2000  # the prompt's end may be anywhere
    assert g.chunk_end(10, 40, 2000) == 10  # nothing fits: wait for a larger budget
    assert g.positions(0, 1536) == [512, 1024, 1536] and ChunkGrid(0).positions(0, 9999) == []


def test_budget_split_between_kinds():
    from dist_engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    mcfg = ModelConfig(path="x", architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8,
                       intermediate_size=8, num_hidden_layers=2, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4,
                       max_position_embeddings=64)
    config = EngineConfig(model=mcfg, cache=CacheConfig(block_size=16, state_checkpoint_memory=4096),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=64))
    paged = PagedKV(1, 8, torch.float32)  # 64 B/token -> 1024 B/block
    state = RecurrentState((("ssm", (2, 8, 8), torch.float32),))  # 512 B/sequence
    assert plan_layout([paged, paged], config, 100_000) == CacheLayout((("full", 100_000 // 2048),))
    layout = plan_layout([paged, state], config, 100_000)
    assert layout.num_state_slots == 4 and layout.num_checkpoints == 8  # 4096 B / 512 B
    assert layout.num_blocks == (100_000 - 12 * 512) // 1024
    with pytest.raises(ValueError, match="recurrent state"):
        plan_layout([paged, state], config, 1500)
    # a sliding-window group beside full attention: each of the 4 sequences needs its window
    # of 32 tokens (2 blocks) + 2 partial blocks, plus a prefill chunk (2048 tokens, 128 blocks)
    slide = PagedKV(1, 8, torch.float32, window=32)
    mixed = plan_layout([paged, slide], config, 1_000_000)
    assert mixed.blocks == (("full", (1_000_000 - (4 * 4 + 128) * 1024) // 1024), ("window32", 4 * 4 + 128))


def test_start_up_log_states_the_bytes_allocated(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="dist_engine"):
        with LLM(tiny_models("llama"), skip_tokenizer_init=True, max_model_len=64,
                 kv_cache_memory="256KiB") as llm:
            info = llm.engine.cache_info
            runner = llm.engine.executor.worker.runner
            real = sum(c.k.nbytes + c.v.nbytes for c in runner.kv_caches)
    assert info["allocated_bytes"] == {"full": real}
    assert real == info["bytes_per_block_by_group"]["full"] * info["num_blocks"]
    assert f"{real / 2**20:.1f} MiB" in caplog.text and "full attention" in caplog.text


def test_window_group_tables_beside_full_attention():
    """A window group's table: grown with the primary, blocks behind the window given back,
    digests marked, a prefix hit cut back to what the window group still caches."""
    from dist_engine.engine.outputs import RequestMetrics
    from dist_engine.engine.sequence import Sequence
    from dist_engine.kv_cache.block_manager import BlockManager
    from dist_engine.kv_cache.window_groups import PLACEHOLDER, WindowGroups

    full = BlockManager(16, 4)
    win = WindowGroups({"window6": BlockManager(6, 4)}, {"window6": 6})

    def seq(i, tokens):
        return Sequence(i, str(i), 0, list(tokens), SamplingParams(), 0, None, RequestMetrics(0.0))

    a = seq(0, range(10, 30))  # 20 tokens = 5 blocks
    assert full.grow(a.block_table, 20) and win.grow(a, 20)
    assert a.group_tables["window6"] == [0, 1, 2, 3, 4] and win.managers["window6"].num_free == 1
    b = seq(1, range(50, 62))
    assert full.grow(b.block_table, 12) and not win.grow(b, 12)  # 3 window blocks, 1 free
    assert b.group_tables["window6"] == []  # all or nothing
    a.num_computed = 20
    full.commit(a.block_table, a.block_hashes, a.token_ids, 20)
    win.commit(a)
    win.free_behind_window(a)  # the next query (position 20) reads keys 15.. : block 3 on
    assert a.group_freed["window6"] == 3 and win.managers["window6"].num_free == 4
    again = seq(2, list(range(10, 30)) + [7])
    hits, hashes = full.match_prefix(again.token_ids)
    again.block_hashes.extend(hashes)
    assert len(hits) == 5 and win.servable(again, 5) == 5  # blocks 3, 4 still cached
    win.take(again, 5)
    assert again.group_tables["window6"] == [PLACEHOLDER] * 3 + [3, 4]
    # blocks given back keep their content until reused: b now takes 5, 2 and 1
    assert win.servable(again, 3) == 3 and win.grow(b, 12)
    assert win.servable(again, 3) == 1  # a hit of 12 or 8 tokens needs block 1: reused by b
    full.free_blocks(hits)
    for s in (a, again, b):
        win.free(s)
    full.free_blocks(a.block_table)
    full.free_blocks(b.block_table)
    assert full.num_free == 16 and win.managers["window6"].num_free == 6
