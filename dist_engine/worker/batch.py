"""Turns a StepInput into the flat tensors and attention metadata one forward pass needs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dist_engine.kernels.paged_attention import available as paged_available
from dist_engine.kernels.paged_attention import make_group
from dist_engine.layers.attention import AttentionGroup, AttentionMetadata
from dist_engine.layers.compressed_rows import build_rows
from dist_engine.layers.state_cache import StateMetadata
from dist_engine.worker.messages import SampledTokens, SeqWork, StepInput

# Sequences feeding at most this many tokens are attended together in one padded group
# (decode, speculative verification); longer prefill chunks get a group each.
SMALL_QUERY = 16
UNFOLD_MIN_KEYS = 4096


@dataclass
class ForwardBatch:
    ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    meta: AttentionMetadata
    # [N] long: token indices whose hidden states are sampled from: the last 1 + num_drafts
    # fed tokens of each sampling sequence, in order
    sample_index: torch.Tensor
    sample_seqs: list[SeqWork]  # the sequences that sample, in that order
    starts: list[int]  # flat index of each sequence's first token (all sequences, step order)
    # sequence shards: the token indices each shard stores (its blocks), in token order
    shard_tokens: list[torch.Tensor] | None = None


def _slots(tables: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of positions ``pos`` ``[B, L]`` through block tables ``[B, max_blocks]``."""
    return tables.gather(1, pos // block_size) * block_size + pos % block_size


def _first_key(s: SeqWork, window: int | None) -> int:
    """The first position any query of ``s`` this step attends (a window starts past 0)."""
    return 0 if window is None else max(0, s.start_pos - window + 1)


def _local_keys(s: SeqWork, block_size: int, shard: int, num_shards: int, first: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (from ``first`` on) and cache slots of the keys of ``s`` on this shard."""
    pos = torch.arange(first, s.context_len)
    used = (s.context_len + block_size - 1) // block_size
    blocks = torch.tensor(s.block_table[:used], dtype=torch.long)[pos // block_size]
    keep = blocks % num_shards == shard
    pos, blocks = pos[keep], blocks[keep] // num_shards
    return pos, blocks * block_size + pos % block_size


def _group(seqs: list[SeqWork], starts: list[int], block_size: int, window: int | None,
           heads_per_kv: int, dtype: torch.dtype, device: torch.device, dense: bool,
           shard: int = 0, num_shards: int = 1, fold: bool = True) -> AttentionGroup:
    B = len(seqs)
    Q = max(len(s.token_ids) for s in seqs)
    # Few queries per sequence (decode, verification) or a short context: fold the G query heads
    # of a KV head into the query axis (one attention call per group). Long chunks over long
    # contexts: one [Q, K] mask shared by all heads, as a G-times folded mask costs more to build
    # than the attention itself there (and the per-KV-head calls cost more than it saves below).
    # Never with one KV head per rank (MLA, DCP): nothing to fold, and G can be 128 heads.
    folded = fold and (Q <= SMALL_QUERY or max(s.context_len for s in seqs) < UNFOLD_MIN_KEYS)
    qlen = torch.tensor([len(s.token_ids) for s in seqs]).view(B, 1)
    ctx = torch.tensor([s.context_len for s in seqs]).view(B, 1)
    i = torch.arange(Q).view(1, Q)
    q_valid = i < qlen  # [B, Q]
    q_pos = ctx - qlen + i  # [B, Q] absolute position of each query
    # a sliding window reads only its last keys: positions before the first query's window are
    # neither gathered nor masked (their blocks may have been given back)
    first = torch.tensor([_first_key(s, window) for s in seqs]).view(B, 1)
    if num_shards == 1:
        K = max(s.context_len - f for s, f in zip(seqs, first.flatten().tolist()))
        n_blocks = (max(s.context_len for s in seqs) + block_size - 1) // block_size
        tables = torch.zeros(B, n_blocks, dtype=torch.long)
        for b, s in enumerate(seqs):
            used = (s.context_len + block_size - 1) // block_size
            tables[b, :used] = torch.tensor(s.block_table[:used], dtype=torch.long)
        j = torch.arange(K).view(1, K)
        key_pos = (first + j).clamp(max=n_blocks * block_size - 1)  # [B, K]
        key_valid = first + j < ctx
        kv_slots = _slots(tables, key_pos, block_size).masked_fill(~key_valid, 0)
    else:  # only this shard's keys: [B, K] with K the most any sequence has here
        keys = [_local_keys(s, block_size, shard, num_shards, _first_key(s, window)) for s in seqs]
        K = max(1, max(len(p) for p, _ in keys))
        key_pos = torch.zeros(B, K, dtype=torch.long)
        kv_slots = torch.zeros(B, K, dtype=torch.long)
        key_valid = torch.zeros(B, K, dtype=torch.bool)
        for b, (p, sl) in enumerate(keys):
            key_pos[b, :len(p)], kv_slots[b, :len(p)], key_valid[b, :len(p)] = p, sl, True
    kp = key_pos.view(B, 1, K)
    allowed = (kp <= q_pos.unsqueeze(-1)) & q_valid.unsqueeze(-1) & key_valid.view(B, 1, K)  # [B, Q, K]
    if window is not None:
        allowed &= kp > q_pos.unsqueeze(-1) - window
    q_index = (torch.tensor(starts).view(B, 1) + i).masked_fill(~q_valid, 0)
    G = heads_per_kv if folded else 1
    allowed = allowed.unsqueeze(1).expand(B, G, Q, K).reshape(B, 1, G * Q, K)
    bias = None  # every query sees every key (a lone decode token): no mask at all
    if not bool(allowed.all()):
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf")).to(device)
    return AttentionGroup(
        q_index=q_index.to(device),
        q_valid=q_valid.to(device),
        kv_slots=kv_slots.to(device),
        bias=bias,
        has_key=allowed.any(-1).to(device),
        dense=dense,
        folded=folded,
        kv_start=_consecutive_start(kv_slots) if B == 1 and num_shards == 1 else None,
    )


def _consecutive_start(kv_slots: torch.Tensor) -> int | None:
    """The first slot when ``kv_slots`` ``[1, K]`` are exactly consecutive, else None."""
    row = kv_slots[0]
    start = int(row[0])
    return start if bool((row == torch.arange(start, start + row.numel())).all()) else None


def build_batch(seqs: tuple[SeqWork, ...], block_size: int, windows: list[int | None],
                heads_per_kv: int, dtype: torch.dtype, device: torch.device,
                shard: int = 0, num_shards: int = 1, cp=None, dcp=None, fold: bool = True,
                paged: bool = False, groups: tuple[str, ...] = ("full",),
                group_heads: tuple[tuple[int, bool], ...] | None = None,
                ratios: tuple[int, ...] = ()) -> ForwardBatch:
    """``windows``: the sliding window of each paged group (``groups``, primary first; a
    sequence's ``block_table`` is the primary's, ``group_tables`` the others'), each group
    getting attention metadata of its own. ``heads_per_kv``: query heads per KV head attended
    together (folded into the mask for short query groups when ``fold``; pass False with one KV
    head per rank), the primary group's; ``group_heads`` the other groups' ``(heads_per_kv,
    fold)`` where they differ (Gemma 4's global layers have fewer KV heads). ``ratios``: the
    compressed kinds' ratios, whose rows (in the primary group's blocks) get ``CompressedRows``
    each. ``paged``: the sequences feeding few tokens go to the C kernel over block
    tables instead (a ``PagedGroup``; the caller checks CPU and a full-precision cache of
    separate K/V, one shard and a built kernel are checked here).

    With ``num_shards`` > 1 (sequence shards: CP x DCP) this rank writes only the K/V of tokens
    whose block lives on its ``shard`` and attends only over its own keys; ``cp`` (the shard
    group) merges the partials, ``dcp`` gathers the query heads of ranks sharing KV heads.
    """
    ids: list[int] = []
    positions: list[int] = []
    starts: list[int] = []
    sample_index: list[int] = []
    for s in seqs:
        starts.append(len(ids))
        positions.extend(range(s.start_pos, s.context_len))
        ids.extend(s.token_ids)
        if s.sample:
            sample_index.extend(range(len(ids) - 1 - s.num_drafts, len(ids)))
    kw = dict(heads_per_kv=heads_per_kv, dtype=dtype, device=device, shard=shard,
              num_shards=num_shards, cp=cp, dcp=dcp, fold=fold, paged=paged)
    meta, shard_tokens = _table_meta(seqs, starts, len(ids), block_size, windows[0], **kw)
    meta.state = state_metadata(seqs, starts, device)
    meta.rows = {m: build_rows(seqs, m, block_size, shard, num_shards, device) for m in ratios}
    for i, (group, window) in enumerate(zip(groups[1:], windows[1:])):
        own = tuple(replace(s, block_table=s.group_tables[i]) for s in seqs)
        if group_heads is not None:
            kw.update(heads_per_kv=group_heads[i][0], fold=group_heads[i][1])
        meta.by_group[group] = _table_meta(own, starts, len(ids), block_size, window, **kw)[0]
    return ForwardBatch(
        ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        meta=meta,
        sample_index=torch.tensor(sample_index, dtype=torch.long, device=device),
        sample_seqs=[s for s in seqs if s.sample],
        starts=starts,
        shard_tokens=shard_tokens,
    )


def _table_meta(seqs: tuple[SeqWork, ...], starts: list[int], num_tokens: int, block_size: int,
                window: int | None, heads_per_kv: int, dtype: torch.dtype, device: torch.device,
                shard: int, num_shards: int, cp, dcp, fold: bool, paged: bool
                ) -> tuple[AttentionMetadata, list[torch.Tensor] | None]:
    """Attention metadata over the sequences' ``block_table``s: where each new token's K/V
    goes on this rank and which keys each query attends; and with sequence shards the token
    indices each shard stores."""
    slots: list[int] = []
    owner: list[int] = []  # shard storing each token
    S = num_shards
    for s in seqs:
        for p in range(s.start_pos, s.context_len):
            block = s.block_table[p // block_size]
            owner.append(block % S)
            if block % S == shard:
                slots.append((block // S) * block_size + p % block_size)
    small = [k for k, s in enumerate(seqs) if len(s.token_ids) <= SMALL_QUERY]
    large = [k for k, s in enumerate(seqs) if len(s.token_ids) > SMALL_QUERY]
    groups = []
    one_group = len(small) == len(seqs) or len(seqs) == 1
    shard_kw = dict(shard=shard, num_shards=S, fold=fold)
    paged = paged and S == 1 and bool(small) and paged_available(dtype)
    if paged and len(small) == len(seqs):
        groups.append(make_group(seqs, starts, block_size, window, num_tokens))
    elif one_group:
        dense = len({len(s.token_ids) for s in seqs}) == 1
        groups.append(_group(list(seqs), starts, block_size, window, heads_per_kv, dtype, device,
                             dense, **shard_kw))
    else:
        if small and paged:
            groups.append(make_group([seqs[k] for k in small], [starts[k] for k in small],
                                     block_size, window, num_tokens))
        elif small:
            groups.append(_group([seqs[k] for k in small], [starts[k] for k in small],
                                 block_size, window, heads_per_kv, dtype, device, False, **shard_kw))
        for k in large:
            groups.append(_group([seqs[k]], [starts[k]], block_size, window, heads_per_kv, dtype,
                                 device, False, **shard_kw))
    # the token indices each shard stores, in token order (this rank writes its own)
    shard_tokens = None
    if S > 1:
        owners = torch.tensor(owner, dtype=torch.long)
        shard_tokens = [torch.nonzero(owners == r).flatten().to(device) for r in range(S)]
    write = None if shard_tokens is None or len(shard_tokens[shard]) == num_tokens else shard_tokens[shard]
    meta = AttentionMetadata(
        num_tokens=num_tokens,
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        groups=groups,
        write_index=write,
        cp=cp if S > 1 else None,
        dcp=dcp,
    )
    return meta, shard_tokens


def state_metadata(seqs: tuple[SeqWork, ...], starts: list[int], device: torch.device
                   ) -> StateMetadata | None:
    """Recurrent layers' view of the step (None when no sequence has a state slot). A
    sequence feeding one verified token (plus any drafts) runs token by token, as decode
    does; longer feeds are prefill chunks, run in the chunked form."""
    if all(s.state_slot is None for s in seqs):
        return None
    if any(s.state_slot is None for s in seqs):
        raise ValueError("every sequence of a model with recurrent layers needs a state slot")
    return StateMetadata(
        slots=torch.tensor([s.state_slot for s in seqs], dtype=torch.long, device=device),
        starts=list(starts),
        lengths=[len(s.token_ids) for s in seqs],
        positions=[s.start_pos for s in seqs],
        fresh=[s.start_pos == 0 for s in seqs],
        recurrent=[len(s.token_ids) - s.num_drafts == 1 for s in seqs],
        keep_per_token=any(s.num_drafts for s in seqs),
    )


def hidden_rows(step: StepInput, batch: ForwardBatch, hidden: torch.Tensor,
                sampled: dict[int, SampledTokens], taps=None) -> dict[int, torch.Tensor]:
    """The final-norm hidden states ``hidden`` ``[T, H]`` of the positions this step verified,
    for the sequences that asked for them: every fed token but rejected drafts. ``taps``
    (``worker.layer_taps.LayerTaps``): the tapped layers' outputs appended to each row."""
    out = {}
    if taps is not None and any(s.return_hidden for s in step.seqs):
        hidden = taps.widen(hidden)  # [T, H * (1 + len(taps.layer_ids))]
    for s, start in zip(step.seqs, batch.starts):
        if s.return_hidden:
            n = len(s.token_ids) - s.num_drafts
            if s.num_drafts and s.seq_id in sampled:
                n += sampled[s.seq_id].num_accepted
            out[s.seq_id] = hidden[start:start + n].clone()
    return out
