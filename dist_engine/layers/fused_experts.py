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

from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import split_range
from dist_engine.layers.moe import Expert, ExpertDict, run_experts


class FusedExperts(ExpertDict):
    """This rank's experts keyed by expert id (``load_fused`` reads their slices); ``act``
    gates each expert's MLP."""

    def __init__(self, hidden: int, inter: int, num_experts: int, comm: Communicator,
                 dtype: torch.dtype, act=F.silu) -> None:
        first, count = split_range(num_experts, comm.world_size, comm.rank)
        super().__init__({str(e): Expert(hidden, inter, dtype, act=act) for e in range(first, first + count)},
                         num_experts)
        self.comm = comm

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x ``[T, hidden]``; weights ``[T, k]`` (fp32), ids ``[T, k]`` -> ``[T, hidden]`` summed
        over every rank's experts."""
        return self.comm.all_reduce(run_experts(self, x, weights, ids))
