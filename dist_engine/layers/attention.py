"""Attention over the paged KV cache (and, for merging partials, its log-sum-exp).

The cache of one layer on one rank is a ``LayerKV``: ``[num_slots, local_num_kv_heads, head_dim]`` for K
and V (model dtype or FP8), slot = block_id * block_size + offset; or a ``TurboQuantKV`` (codes),
over which attention runs in each KV head's rotated basis (queries rotated in, output out). Sequences are attended in groups: each group is a padded
batch ``[B, Q]`` of query tokens against ``[B, K]`` gathered key slots with a precomputed
allowed-mask (causal by absolute position, sliding window, padding). Prefill chunks form their
own groups; decode and verification tokens (a few per sequence) share one. The metadata is built
once per step by the model runner and reused by every layer.

The log-sum-exp lets partial attentions over disjoint key sets (key tiles here, sequence shards
later) be merged exactly: ``o = Σ exp(lse_i − lse) · o_i`` with ``lse = logsumexp_i(lse_i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dist_engine.kernels.paged_attention import PagedGroup
from dist_engine.layers.compressed_rows import CompressedRows
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.state_cache import StateMetadata
from dist_engine.layers.tq_cache import TurboQuantKV

# Upper bound on score elements materialised at once; longer contexts are tiled over keys.
MAX_SCORE_ELEMENTS = 1 << 24


@dataclass
class AttentionGroup:
    q_index: torch.Tensor  # [B, Q] long: flat token index of each query (padding -> 0)
    q_valid: torch.Tensor  # [B, Q] bool
    kv_slots: torch.Tensor  # [B, K] long: cache slot of each key (padding -> 0)
    # Additive mask (0 allowed, -inf not) in the model dtype. Folded (few queries: decode,
    # verification): the G query heads sharing a KV head folded into the query axis,
    # [B, 1, G*Q, K]. Not folded (long prefill chunks): [B, 1, Q, K], shared by every head.
    # None: every query sees every key (one decode token).
    bias: torch.Tensor | None
    has_key: torch.Tensor  # [B, 1, G*Q] or [B, 1, Q] bool: the query attends at least one key
    dense: bool  # q_index is exactly arange(B*Q): reshape instead of gather/scatter
    folded: bool = True
    # B == 1 and the keys sit in consecutive slots kv_start, kv_start + 1, ...: attention reads
    # a view of the cache instead of gathering (the usual case for a lone sequence)
    kv_start: int | None = None


@dataclass
class StaticDecodeGroup:
    """One query per sequence against ``K`` keys with every shape fixed, so a CUDA graph can
    replay it (worker/cuda_graph.py computes both tensors on the device, once per step)."""
    kv_slots: torch.Tensor  # [B, K] long: cache slot of each key (masked keys -> slot 0)
    masked: torch.Tensor  # [B, 1, 1, K] bool: the key is not the sequence's (or out of window)


@dataclass
class AttentionMetadata:
    num_tokens: int
    slot_mapping: torch.Tensor  # [W] long: where each stored token's K/V is written
    # padded groups for PyTorch's kernel, or (decode / verification on CPU) one PagedGroup for
    # the C kernel over block tables, or (decode in a CUDA graph) one StaticDecodeGroup
    groups: list[AttentionGroup | PagedGroup | StaticDecodeGroup] = field(default_factory=list)
    # Sequence sharding: the W tokens (of T) whose K/V this rank stores (None: all of them),
    # the communicator of the ranks holding the other shards (None: not sharded), and inside a
    # TP group the ranks that share this rank's KV heads (DCP; None: none).
    write_index: torch.Tensor | None = None
    cp: Any = None
    dcp: Any = None
    # Split prefill over CP: this rank computes only the tokens it stores (``split_own``, of the
    # step's T); ``split_tokens[r]`` are shard r's. Queries are gathered before attention and
    # each rank keeps its own rows of the merged output. None: every rank computes every token.
    split_tokens: list[torch.Tensor] | None = None
    split_own: torch.Tensor | None = None
    # models with recurrent layers: each sequence's state slot and how its tokens run
    state: StateMetadata | None = None
    # the other paged groups' metadata (sliding-window layers beside full attention), by name
    by_group: dict[str, AttentionMetadata] = field(default_factory=dict)
    # Layers past the last one that stores K/V (Gemma 4's KV-shared layers) change no cache, so
    # only the rows that are sampled matter there: ``tail_rows`` [N] (of the step's T; empty:
    # none is) and ``tail`` their own metadata. None: every row runs through every layer.
    tail_rows: torch.Tensor | None = None
    tail: AttentionMetadata | None = None
    # compressed kinds (``PagedKV(ratio=m)``, in the primary group): where their rows are, by m
    rows: dict[int, CompressedRows] = field(default_factory=dict)

    def for_group(self, group: str) -> AttentionMetadata:
        """The metadata a layer of paged group ``group`` attends with (this one: the primary)."""
        return self.by_group.get(group, self)


def write_kv(kv: LayerKV | TurboQuantKV, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    # k, v [T, Hk, D]; slot_mapping [W]
    if kv.observe:
        kv.note(k, v)
    if meta.write_index is not None:
        k, v = k[meta.write_index], v[meta.write_index]
    kv.write(meta.slot_mapping, k, v)


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention partials over disjoint key sets, in list order, in fp32.

    outs[i] ``[..., L, D]``, lses[i] ``[..., L]`` (-inf where a partial saw no key). A query that
    no partial attends gets output 0 and lse -inf, never NaN.
    """
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.zeros_like(outs[0], dtype=torch.float32)
    for o, part_lse in zip(outs, lses):
        out += torch.exp(part_lse - safe).unsqueeze(-1) * o.float()
    return out, lse


# PyTorch's fused CPU attention returns the log-sum-exp alongside the output; elsewhere (and if
# a torch build lacks it) the explicit path below computes the same thing.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
            scale: float, need_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    # q [B, Hk, L, D]; k, v [B, Hk, K, D]; bias [B, 1, L, K], or [B, 1, Q, K] shared by the
    # L / Q query heads folded into L (a long-chunk mask; explicit path only), or None.
    # Without ``need_lse`` the explicit path takes one softmax instead of the log-sum-exp's
    # dozen small operators (on a GPU each is a kernel launch; decode is launch-bound there).
    if q.device.type == "cpu" and _CPU_FLASH is not None and (bias is None or bias.shape[-2] == q.shape[-2]):
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse.float()
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, Hk, L, K]
    B, Hk, L, K = scores.shape
    if bias is not None:
        Qb = bias.shape[-2]
        scores = (scores + bias.float() if Qb == L else
                  (scores.view(B, Hk, L // Qb, Qb, K) + bias.float().unsqueeze(2)).view(B, Hk, L, K))
    if not need_lse:  # a query that sees no key (a padding row) gets 0, not NaN
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul((probs if bias is None else probs.nan_to_num(0.0)).to(v.dtype), v), None
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hk, L]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe.unsqueeze(-1))  # masked entries -> exactly 0
    return torch.matmul(probs.to(v.dtype), v), lse


def paged_attention(q: torch.Tensor, kv: LayerKV | TurboQuantKV, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q ``[T, Hq, D]`` against the cache -> out ``[T, Hq, D]``.

    With sequence shards (``meta.cp``)
    each rank attends over its own keys and the partials of all shards are merged in fp32, in
    rank order, so every rank gets the same bits. With DCP (``meta.dcp``) the ranks sharing
    this rank's KV heads first gather their query heads, attend all of them over their own
    keys, and after the merge each keeps its own heads.
    """
    Hq = q.shape[1]
    if meta.split_tokens is not None:
        q = _gather_split_queries(q, meta)  # [T, Hq, D]
    if meta.dcp is not None:
        q = torch.cat(meta.dcp.gather_all(q.contiguous()), dim=1)  # [T, DCP * Hq, D]
    # in the cache's basis (TurboQuant: rotated; out is linear in V, so partials merge as before)
    out, lse = local_attention(kv.to_cache_basis(q), kv, meta, scale, need_lse=meta.cp is not None)
    out = kv.from_cache_basis(out)
    if meta.cp is not None:  # a query with no key on a shard has out 0 and lse -inf there
        outs = meta.cp.gather_all(out.float())
        lses = meta.cp.gather_all(lse)
        out = merge_partials(outs, lses)[0].to(q.dtype)
    if meta.dcp is not None:
        out = out[:, meta.dcp.rank * Hq:(meta.dcp.rank + 1) * Hq].contiguous()
    if meta.split_tokens is not None:
        out = out[meta.split_own]
    return out


def _gather_split_queries(q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Own queries ``[W, Hq, D]`` -> every token's ``[T, Hq, D]``, from all CP ranks."""
    width = max(len(ix) for ix in meta.split_tokens)
    padded = q.new_zeros(width, *q.shape[1:])
    padded[: q.shape[0]] = q
    full = q.new_empty(meta.num_tokens, *q.shape[1:])
    for ix, part in zip(meta.split_tokens, meta.cp.gather_all(padded)):
        full[ix] = part[: len(ix)]
    return full


def _attend_tiled(qg: torch.Tensor, kv: LayerKV, g: AttentionGroup, scale: float, Hk: int, G: int,
                  need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qg ``[B, Hk, G*Q, D]`` (folded) or ``[B, Hq, Q, D]`` -> (out like qg, lse ``qg[..., 0]``;
    None when not ``need_lse`` and the keys fit one tile).

    The explicit path materialises scores, so long contexts are tiled over keys and merged by
    LSE. Unfolded, the CPU kernel gets each KV head's K/V broadcast to its G query heads (a view,
    no copy); the explicit path folds the G heads into the query axis and broadcasts the
    [Q, K] mask over them instead, so K/V are never repeated either."""
    B, K = g.kv_slots.shape
    tile = K if _CPU_FLASH is not None and qg.device.type == "cpu" else max(
        1, MAX_SCORE_ELEMENTS // max(1, qg.shape[1] * qg.shape[2] * B))
    need_lse = need_lse or tile < K  # tiles are merged by their log-sum-exp
    outs, lses = [], []
    for k0 in range(0, K, tile):
        if g.kv_start is not None:
            kg, vg = kv.window(g.kv_start + k0, min(tile, K - k0), qg.dtype)
            kg, vg = kg.unsqueeze(0), vg.unsqueeze(0)
        else:
            kg, vg = kv.gather(g.kv_slots[:, k0:k0 + tile], qg.dtype)  # [B, k, Hk, D] each
        kg, vg = kg.transpose(1, 2), vg.transpose(1, 2)  # [B, Hk, k, D]
        bias = None if g.bias is None else g.bias[..., k0:k0 + tile]
        if g.folded:
            o, lse = _attend(qg, kg, vg, bias, scale, need_lse)
        elif _CPU_FLASH is None or qg.device.type != "cpu":  # heads of a KV head are adjacent
            Hq, Q, D = qg.shape[1:]
            o, lse = _attend(qg.reshape(B, Hk, G * Q, D), kg, vg, bias, scale, need_lse)
            o, lse = o.view(B, Hq, Q, D), (lse.view(B, Hq, Q) if need_lse else None)
        else:  # one call per KV head, its K/V expanded (a view) over its G query heads
            parts = [_attend(qg[:, j * G:(j + 1) * G], kg[:, j:j + 1].expand(-1, G, -1, -1),
                             vg[:, j:j + 1].expand(-1, G, -1, -1), bias, scale) for j in range(Hk)]
            o = torch.cat([p[0] for p in parts], dim=1)
            lse = torch.cat([p[1] for p in parts], dim=1)
        outs.append(o)
        lses.append(lse)
    return merge_partials(outs, lses)


def local_attention(q: torch.Tensor, kv: LayerKV, meta: AttentionMetadata, scale: float,
                     need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out ``[T, Hq, D]``, lse ``[T, Hq]`` fp32 or None unless ``need_lse``); a query with no
    visible key gets lse -inf (and, when merging, out 0)."""
    T, Hq, D = q.shape
    Hk = kv.local_num_kv_heads
    G = Hq // Hk  # query heads per KV head on this rank
    first = meta.groups[0]
    if isinstance(first, StaticDecodeGroup):  # (never with sequence shards)
        return _static_decode(q, kv, first, scale), None
    if isinstance(first, PagedGroup) and first.covers_all:  # (never with sequence shards)
        out = q.new_empty(T, Hq, D)
        kv.attend_paged(q, first, scale, out)
        return out, None
    single = len(meta.groups) == 1 and meta.groups[0].dense
    out = None if single else q.new_zeros(T, Hq, D)
    lse_out = None if single or not need_lse else torch.full((T, Hq), float("-inf"), device=q.device)
    for g in meta.groups:
        if isinstance(g, PagedGroup):
            kv.attend_paged(q, g, scale, out)
            continue
        B, Q = g.q_index.shape
        qg = q.view(B, Q, Hq, D) if g.dense else q[g.q_index]  # [B, Q, Hq, D]
        if g.folded:
            qg = qg.view(B, Q, Hk, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * Q, D)
        else:
            qg = qg.permute(0, 2, 1, 3)  # [B, Hq, Q, D]
        o, lse = _attend_tiled(qg, kv, g, scale, Hk, G, need_lse)
        if need_lse:
            lse = lse.masked_fill(~g.has_key.expand_as(lse), float("-inf"))
            # a query with no key on this shard: 0, never NaN
            o = o.masked_fill(~g.has_key.expand_as(lse).unsqueeze(-1), 0.0)
        if g.folded:
            o = o.to(q.dtype).view(B, Hk, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B, Q, Hq, D)
            if need_lse:
                lse = lse.view(B, Hk, G, Q).permute(0, 3, 1, 2).reshape(B, Q, Hq)
        else:
            o = o.to(q.dtype).permute(0, 2, 1, 3)  # [B, Q, Hq, D]
            if need_lse:
                lse = lse.permute(0, 2, 1)  # [B, Q, Hq]
        if single:
            return o.reshape(T, Hq, D), (lse.reshape(T, Hq) if need_lse else None)
        idx = g.q_index[g.q_valid]
        out[idx] = o[g.q_valid]
        if need_lse:
            lse_out[idx] = lse[g.q_valid]
    return out, lse_out


def _static_decode(q: torch.Tensor, kv: LayerKV, g: StaticDecodeGroup, scale: float) -> torch.Tensor:
    """q ``[B, Hq, D]`` (one query per sequence, at position context_len - 1) -> ``[B, Hq, D]``.
    Masked keys read slot 0 (finite: zeroed, then only ever real K/V); every sequence sees at
    least its own token, so no row is empty."""
    B, Hq, D = q.shape
    Hk = kv.local_num_kv_heads
    k, v = kv.gather(g.kv_slots, q.dtype)  # [B, K, Hk, D] each
    qf = q.view(B, Hk, Hq // Hk, D)  # the query heads of each KV head together
    scores = torch.matmul(qf, k.permute(0, 2, 3, 1)).float() * scale  # [B, Hk, G, K]
    scores = scores.masked_fill(g.masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v.permute(0, 2, 1, 3)).reshape(B, Hq, D)  # [B, Hk, G, D] -> [B, Hq, D]
