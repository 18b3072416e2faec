"""DeepSeek-V4's attention over a raw window plus compressed rows, with per-head sinks.

One softmax covers three kinds of keys: the layer's raw window (its last ``sliding_window``
positions, a paged window kind), its compressed rows (all a query may read for heavily
compressed attention; the indexer's selection for compressed sparse attention) and a learned
per-head *sink* that takes probability mass but has no value. Each part is attended on its own
with its log-sum-exp and merged exactly (``merge_partials``):

    o = o_parts * Z / (Z + exp(sink)) = o_parts * sigmoid(lse - sink),   Z = exp(lse)

Sequence shards hold disjoint blocks of both the window and the compressed rows: every rank
attends its own keys, its partials are merged locally (window, then compressed) and then over
the shard group in shard order, so every rank holds the same result; DCP ranks first gather the
query heads of their group (they share the one KV head), as ``paged_attention`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_engine.layers.attention import (
    MAX_SCORE_ELEMENTS,
    AttentionMetadata,
    local_attention,
    merge_partials,
)
from dist_engine.layers.compressed_rows import CompressedRows
from dist_engine.layers.kv_cache import LayerKV


@dataclass
class CompressedPart:
    """A layer's compressed rows for this step, and which of them each query reads."""

    kv: LayerKV  # the compressed rows' cache
    rows: CompressedRows
    positions: torch.Tensor  # [T] of the step's tokens
    spans: list[tuple[int, int]]  # per sequence: (first token, count)
    token_seq: torch.Tensor  # [T] each token's sequence
    selected: torch.Tensor | None  # [T, k] row ids (-1: none) from the indexer; None: all rows


def attend(q: torch.Tensor, window: LayerKV, wmeta: AttentionMetadata, scale: float,
           sinks: torch.Tensor, part: CompressedPart | None) -> torch.Tensor:
    """q ``[T, H, D]`` (this rank's heads; ``sinks`` ``[H]`` fp32) -> out ``[T, H, D]``."""
    H = q.shape[1]
    dcp = wmeta.dcp
    if dcp is not None:
        q = torch.cat(dcp.gather_all(q.contiguous()), dim=1)  # [T, DCP * H, D]
    out, lse = local_attention(q, window, wmeta, scale, need_lse=True)
    if part is not None:
        rows_out, rows_lse = (_selected if part.selected is not None else _dense)(q, part, scale)
        out, lse = merge_partials([out, rows_out], [lse, rows_lse])
    if wmeta.cp is not None:  # the shards' partials, in shard order
        out, lse = merge_partials(wmeta.cp.gather_all(out.float().contiguous()),
                                  wmeta.cp.gather_all(lse.contiguous()))
    if dcp is not None:
        out, lse = out[:, dcp.rank * H:(dcp.rank + 1) * H], lse[:, dcp.rank * H:(dcp.rank + 1) * H]
    keep = torch.sigmoid(lse - sinks.float())  # [T, H]: the share the sink leaves
    return (out.float() * keep.unsqueeze(-1)).to(q.dtype)


def _softmax_part(scores: torch.Tensor, allowed: torch.Tensor, keys: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """scores ``[..., L, K]`` fp32 over keys ``[..., K, D]`` where ``allowed`` (broadcast) ->
    (out ``[..., L, D]`` fp32, lse ``[..., L]``); a query with no key gets 0 and -inf."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.matmul(torch.exp(scores - safe.unsqueeze(-1)), keys.float()), lse


def _dense(q: torch.Tensor, part: CompressedPart, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row a query may read (heavily compressed attention), per sequence, in query tiles."""
    T, H, D = q.shape
    out = q.new_zeros(T, H, D, dtype=torch.float32)
    lse = torch.full((T, H), float("-inf"), device=q.device)
    rows = part.rows
    limit = rows.query_limit(part.positions)
    for b, (first, n) in enumerate(part.spans):
        R = rows.count[b]
        local = rows.local[b, :R]
        if not n or not bool(local.any()):
            continue
        keys = part.kv.gather(rows.slots[b, :R], q.dtype)[0].view(R, D)  # K = V
        r = torch.arange(R, device=q.device)
        tile = max(1, MAX_SCORE_ELEMENTS // (H * R))
        for t0 in range(first, first + n, tile):
            t1 = min(first + n, t0 + tile)
            scores = torch.matmul(q[t0:t1], keys.T).float() * scale  # [t, H, R]
            allowed = ((r < limit[t0:t1, None]) & local).unsqueeze(1)  # [t, 1, R]
            out[t0:t1], lse[t0:t1] = _softmax_part(scores, allowed, keys)
    return out, lse


def _selected(q: torch.Tensor, part: CompressedPart, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's rows of each query (compressed sparse attention) that this rank holds."""
    T, H, D = q.shape
    sel = part.selected
    k = sel.shape[1]
    out = q.new_zeros(T, H, D, dtype=torch.float32)
    lse = torch.full((T, H), float("-inf"), device=q.device)
    tile = max(1, MAX_SCORE_ELEMENTS // (k * max(H, D)))
    for t0 in range(0, T, tile):
        t1 = min(T, t0 + tile)
        seq, row = part.token_seq[t0:t1, None], sel[t0:t1].clamp(min=0)
        ok = (sel[t0:t1] >= 0) & part.rows.local[seq, row]  # [t, k]
        keys = part.kv.gather(part.rows.slots[seq, row], q.dtype)[0].squeeze(2)  # [t, k, D]
        scores = torch.matmul(q[t0:t1], keys.transpose(1, 2)).float() * scale  # [t, H, k]
        out[t0:t1], lse[t0:t1] = _softmax_part(scores, ok.unsqueeze(1), keys)
    return out, lse
