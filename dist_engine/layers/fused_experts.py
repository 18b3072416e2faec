"""Routed experts whose checkpoint fuses every expert into 3-D tensors, split by expert over TP.

Checkpoints written by transformers 5 without a per-expert conversion (Gemma 4) store
``experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first) and ``experts.down_proj`` ``[E, H, I]``.
Rank r keeps the experts ``split_range(E, tp, r)`` as separate ``Expert`` modules (so each
product runs through the packed CPU kernel like any other weight) and reads only their slices
of the fused tensors (``load_fused``, called by the loader). ``forward`` sums the weighted
outputs of this rank's experts and completes the sum over ranks with one all-reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import split_range
from dist_engine.layers.moe import Expert, ExpertDict, run_experts

if TYPE_CHECKING:
    from dist_engine.experts.cache import ExpertCache


class FusedExperts(ExpertDict):
    """This rank's experts keyed by expert id (``load_fused`` reads their slices); ``act``
    gates each expert's MLP. With ``expert_cache`` it holds none: they are paged from
    ``prefix`` (the checkpoint's ``model.layers.{layer}.experts.``) and routed by ``router``
    (the block's own, which the cache also applies early to prefetch)."""

    def __init__(self, hidden: int, inter: int, num_experts: int, comm: Communicator,
                 dtype: torch.dtype, act=F.silu, expert_cache: ExpertCache | None = None,
                 layer: int = 0, prefix: str = "", router: nn.Module | None = None) -> None:
        first, count = split_range(num_experts, comm.world_size, comm.rank)
        held = {} if expert_cache is not None else {
            str(e): Expert(hidden, inter, dtype, act=act) for e in range(first, first + count)}
        super().__init__(held, num_experts)
        self.comm = comm
        self.paged = None if expert_cache is None else expert_cache.register(
            layer, prefix, (first, count), lambda: Expert(hidden, inter, dtype, act=act), router)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                router_input: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[T, hidden]``; weights ``[T, k]`` (fp32), ids ``[T, k]`` -> ``[T, hidden]`` summed
        over every rank's experts; ``router_input`` ``[T, hidden]``: what the routers read (the
        next paged layer's prefetch routes it)."""
        if self.paged is not None:
            return self.comm.all_reduce(self.paged.run(x, weights, ids, router_input=router_input))
        return self.comm.all_reduce(run_experts(self, x, weights, ids))
