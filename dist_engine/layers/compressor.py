"""DeepSeek-V4's token compressor: one compressed row per ``ratio`` positions.

Row ``w`` summarises the window of positions ``[w m, (w + 1) m)``: each token projects a value
``C = x W_kv`` and a gate ``Z = x W_gate`` (plus a learned bias per position in the window), and
the row is the softmax(Z)-weighted sum of the values per channel, RMS-normalised and rotated to
the window's first position (``compress`` RoPE). With ``overlap`` (compressed sparse attention
and its indexer) every token projects two series: ``Cb`` (its own window's) and ``Ca`` (the next
window's), and row ``w`` weighs window ``w - 1``'s ``Ca`` together with window ``w``'s ``Cb``
(2m entries; row 0 has no previous window). Heavily compressed attention uses disjoint windows.

The tokens of a window arrive over several steps, so each sequence keeps its latest positions'
projections in a ring (``RecurrentState(positional=True)``, row = position mod ring length). The
ring holds the window a step may complete and, with overlap, the one before it, plus
``MAX_DRAFTS - 1`` more positions: a verification writes rows for up to ``MAX_DRAFTS`` drafts, and
after rejecting them the next step must still find every position it reads. No rollback is
needed: a rejected draft's row is past the accepted position, rewritten before any read, and the
compressed row it may have completed is rewritten when its window really completes (a query
never reads a row before that, ``CompressedRows.query_limit``). Every rank runs every token
through the compressor (its weights are replicated), so the rings agree across ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_engine.config.speculative import MAX_SPECULATIVE_TOKENS
from dist_engine.layers.compressed_rows import CompressedRows
from dist_engine.layers.linear import ColumnParallelLinear
from dist_engine.layers.loading import copy_checked
from dist_engine.layers.norm import Fp32RMSNorm
from dist_engine.layers.rotary import TrailingRotary
from dist_engine.layers.state_cache import LayerState, StateMetadata

MAX_DRAFTS = MAX_SPECULATIVE_TOKENS


def replicated(in_features: int, out_features: int, dtype: torch.dtype,
               quant: tuple[int, int] | None = None) -> ColumnParallelLinear:
    """A linear layer every rank holds whole."""
    return ColumnParallelLinear(in_features, {None: (0, out_features, 0)}, False, dtype, quant)


class Compressor(nn.Module):
    """``kv_proj`` / ``gate_proj`` ``[c D, hidden]`` (c = 2 with overlap), ``position_bias``
    ``[ratio, c D]`` (fp32), ``kv_norm`` over ``D`` (transformers' module names)."""

    def __init__(self, hidden: int, head_dim: int, ratio: int, overlap: bool, rotary: TrailingRotary,
                 norm_eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        c = 2 if overlap else 1
        self.ratio, self.overlap, self.head_dim, self.width = ratio, overlap, head_dim, c * head_dim
        self.kv_proj = replicated(hidden, c * head_dim, dtype)  # bf16 as shipped, never FP8
        self.gate_proj = replicated(hidden, c * head_dim, dtype)
        self.position_bias = nn.Parameter(torch.empty(ratio, c * head_dim), requires_grad=False)
        self.kv_norm = Fp32RMSNorm(head_dim, norm_eps)
        self.rotary = rotary  # shared with the layer (not a parameter)
        self.ring = c * ratio + MAX_DRAFTS - 1
        self.dtype = dtype

    def load(self, which: str, full, shard_id: object = None) -> None:  # position_bias
        copy_checked(self.position_bias.data, full[:].float())

    def state_tensors(self, prefix: str) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
        """The ring of one sequence: ``{prefix}kv`` and ``{prefix}gate`` ``[ring, c D]``."""
        shape = (self.ring, self.width)
        return ((f"{prefix}kv", shape, self.dtype), (f"{prefix}gate", shape, self.dtype))

    def forward(self, x: torch.Tensor, state: LayerState, smeta: StateMetadata, rows: CompressedRows,
                token_seq: torch.Tensor, positions: torch.Tensor, prefix: str) -> torch.Tensor:
        """x ``[T, hidden]`` of the step (``token_seq`` ``[T]``: each token's sequence index,
        ``positions`` ``[T]``) -> the rows this step completes ``[E, D]``, sequence-major in row
        order (as ``rows.write_slots``); each sequence's ring then holds its latest positions."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)  # [T, c D] each
        ring_kv, ring_gate = state.tensors[f"{prefix}kv"], state.tensors[f"{prefix}gate"]
        old_kv, old_gate = ring_kv[smeta.slots], ring_gate[smeta.slots]  # [B, R, c D] copies
        out = self._rows(kv, gate, old_kv, old_gate, smeta, rows)
        # the ring keeps each sequence's last `ring` positions of the step
        end = torch.tensor([p + n for p, n in zip(smeta.positions, smeta.lengths)], device=x.device)
        keep = positions >= end[token_seq] - self.ring
        dst = smeta.slots[token_seq[keep]] * self.ring + positions[keep] % self.ring
        ring_kv.view(-1, self.width).index_copy_(0, dst, kv[keep])
        ring_gate.view(-1, self.width).index_copy_(0, dst, gate[keep])
        return out

    def _rows(self, kv: torch.Tensor, gate: torch.Tensor, old_kv: torch.Tensor, old_gate: torch.Tensor,
              smeta: StateMetadata, rows: CompressedRows) -> torch.Tensor:
        m, R, D, dev = self.ratio, self.ring, self.head_dim, kv.device
        spans = [(b, w) for b, (f, e) in enumerate(zip(rows.new_first, rows.new_end)) for w in range(f, e)]
        if not spans:
            return kv.new_zeros(0, D)
        seq = torch.tensor([b for b, _ in spans], device=dev)
        w = torch.tensor([w for _, w in spans], device=dev)
        W = (2 if self.overlap else 1) * m
        pos = w.view(-1, 1) * m - (W - m) + torch.arange(W, device=dev)  # [E, W] window positions
        start = torch.tensor(smeta.positions, device=dev)[seq].view(-1, 1)
        first = torch.tensor(smeta.starts, device=dev)[seq].view(-1, 1)
        B = old_kv.shape[0]
        # each position from the step's tokens, or (before the step) from the sequence's ring
        src = torch.where(pos >= start, B * R + first + pos - start, seq.view(-1, 1) * R + pos % R)
        src = src.clamp(min=0)
        src_kv = torch.cat([old_kv.reshape(B * R, -1), kv])[src]  # [E, W, c D]
        src_gate = torch.cat([old_gate.reshape(B * R, -1), gate])[src] + self.position_bias[torch.arange(W, device=dev) % m]
        if self.overlap:  # window w - 1's Ca (first D channels), then window w's Cb (last D)
            src_kv = torch.cat([src_kv[:, :m, :D], src_kv[:, m:, D:]], dim=1)  # [E, 2m, D]
            src_gate = torch.cat([src_gate[:, :m, :D], src_gate[:, m:, D:]], dim=1)
            before = (pos < 0).unsqueeze(-1)  # row 0 has no previous window
            src_kv = src_kv.masked_fill(before, 0.0)
            src_gate = src_gate.masked_fill(before, float("-inf"))
        weights = src_gate.softmax(dim=1, dtype=torch.float32).to(src_kv.dtype)
        pooled = self.kv_norm((src_kv * weights).sum(dim=1))  # [E, D]
        return self.rotary(w * m, pooled)
