"""Routed experts whose checkpoint fuses every expert into 3-D tensors, split by expert over TP.

Checkpoints written by transformers 5 without a per-expert conversion (Gemma 4) store
``experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first) and ``experts.down_proj`` ``[E, H, I]``.
Rank r keeps the experts ``split_range(E, tp, r)`` as separate ``Expert`` modules (so each
product runs through the packed CPU kernel like any other weight) and reads only their slices
of the fused tensors (``load_fused``, called by the loader). ``forward`` sums the weighted
outputs of this rank's experts and completes the sum over ranks with one all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import split_range
from dist_engine.layers.moe import Expert, run_experts


class FusedExperts(nn.ModuleDict):
    """This rank's experts keyed by expert id; ``act`` gates each expert's MLP."""

    def __init__(self, hidden: int, inter: int, num_experts: int, comm: Communicator,
                 dtype: torch.dtype, act=F.silu) -> None:
        first, count = split_range(num_experts, comm.world_size, comm.rank)
        super().__init__({str(e): Expert(hidden, inter, dtype, act=act) for e in range(first, first + count)})
        self.num_experts = num_experts
        self.comm = comm

    def load_fused(self, which: str, full) -> list[tuple[str, object]]:
        """Copy every local expert's slice of a fused tensor (``full``: a tensor or lazy slice);
        returns the (parameter name under this module, shard id) pairs it filled."""
        if which not in ("gate_up_proj", "down_proj"):
            raise ValueError(f"fused expert tensor {which!r} is not gate_up_proj or down_proj")
        if full.shape[0] != self.num_experts:
            raise ValueError(f"expected {self.num_experts} experts on dim 0, got {tuple(full.shape)}")
        filled: list[tuple[str, object]] = []
        for key, expert in self.items():
            w = full[int(key)]  # [2I, H] or [H, I]: this expert's slice only
            if which == "down_proj":
                expert.down_proj.load("weight", w)
                filled.append((f"{key}.down_proj.weight", None))
                continue
            if w.shape[0] % 2:
                raise ValueError(f"gate_up_proj rows {w.shape[0]} do not split into gate and up")
            inter = w.shape[0] // 2
            for part, rows in enumerate((w[:inter], w[inter:])):
                expert.gate_up_proj.load("weight", rows, part)
                filled.append((f"{key}.gate_up_proj.weight", part))
        return filled

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x ``[T, hidden]``; weights ``[T, k]`` (fp32), ids ``[T, k]`` -> ``[T, hidden]`` summed
        over every rank's experts."""
        return self.comm.all_reduce(run_experts(self, x, weights, ids))
