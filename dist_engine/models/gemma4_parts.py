"""Gemma 4's small pieces: its RMSNorm (scaled in fp32 before rounding), the weightless norm of
V and the router, the MoE router with its two learnt scales, and replicated projections."""

from __future__ import annotations

import torch
from torch import nn

from dist_engine.layers.linear import ColumnParallelLinear
from dist_engine.layers.loading import copy_checked
from dist_engine.layers.norm import RMSNorm


def replicated(in_features: int, out_features: int, dtype: torch.dtype) -> ColumnParallelLinear:
    """A projection every rank holds whole (small ones, where a collective would cost more)."""
    return ColumnParallelLinear(in_features, {None: (0, out_features, 0)}, False, dtype)


def unit_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a learnt scale over the last axis, in fp32 (V, the router's input)."""
    return torch.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class Gemma4RMSNorm(RMSNorm):
    """``w * x / rms(x)`` with the weight applied in fp32 before rounding to the model dtype
    (Llama's norm rounds first). fp32 models take the shared (kernel) path: same arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if x.dtype == torch.float32:
            return super().forward(x)
        return torch.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == torch.float32:
            return super().add_forward(x, delta)
        x = x + delta
        return x, self(x)


class Gemma4TextRouter(nn.Module):
    """Softmax routing over every expert from ``proj(norm(x) * scale / sqrt(hidden))``: the top
    ``top_k`` probabilities, renormalised to sum to one, times the chosen experts'
    ``per_expert_scale``. Replicated: every rank routes identically."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.top_k, self.eps = top_k, eps
        self.proj = replicated(hidden, num_experts, dtype)
        self.scale = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts, dtype=dtype), requires_grad=False)

    def load(self, which: str, full, shard_id: object = None) -> None:
        copy_checked(getattr(self, which).data, full[:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, hidden]`` -> (weights ``[T, k]`` fp32, expert ids ``[T, k]``)."""
        h = unit_rms_norm(x, self.eps) * self.scale * x.shape[-1] ** -0.5
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids
