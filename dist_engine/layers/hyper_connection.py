"""Manifold-constrained hyper-connections (DeepSeek-V4): ``hc_mult`` residual streams per token.

A block reads one input collapsed from the streams and writes its output back into all of them,
with the streams mixed among themselves on the way. The three weightings come from one small
projection of the (RMS-normalised) streams, in fp32 as the reference computes them::

    pre  = sigmoid(a_pre * s0 + b_pre) + eps          [n]    collapse: x = sum_j pre_j h_j
    post = 2 sigmoid(a_post * s1 + b_post)            [n]    expand:   h'_k = post_k y + ...
    comb = Sinkhorn(softmax(A_comb * s2 + B_comb))    [n, n] mix:      ... + sum_j comb_jk h_j

Sinkhorn's alternate row/column normalisation makes ``comb`` (nearly) doubly stochastic, so
mixing never amplifies the streams. The final ``HyperHead`` collapses the streams before the
model's norm with its own ``pre`` weighting. Every rank holds the full streams (the blocks'
outputs are all-reduced), so nothing here is split by tensor parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.layers.loading import copy_checked


def _normed(streams: torch.Tensor, eps: float) -> torch.Tensor:
    """``[T, n, H]`` -> the flattened streams in fp32, RMS-normalised without a weight."""
    flat = streams.flatten(1).float()
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


class _Loadable(nn.Module):
    def load(self, which: str, full, shard_id: object = None) -> None:
        copy_checked(getattr(self, which).data, full[:])


class HyperConnection(_Loadable):
    """``fn`` ``[(2 + n) n, n H]``, ``base`` ``[(2 + n) n]``, ``scale`` ``[3]`` (all fp32)."""

    def __init__(self, hidden: int, mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float) -> None:
        super().__init__()
        n = mult
        self.mult, self.iters, self.hc_eps, self.norm_eps = n, sinkhorn_iters, hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * hidden), requires_grad=False)
        self.base = nn.Parameter(torch.empty((2 + n) * n), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(3), requires_grad=False)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams ``[T, n, H]`` -> (post ``[T, n]``, comb ``[T, n, n]``, both fp32; the
        collapsed block input ``[T, H]`` in the streams' dtype)."""
        n = self.mult
        mix = F.linear(_normed(streams, self.norm_eps), self.fn.float())  # [T, (2 + n) n]
        a_pre, a_post, a_comb = mix.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_comb = self.base.split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.unbind(0)
        pre = torch.sigmoid(a_pre * s_pre + b_pre) + self.hc_eps
        post = 2 * torch.sigmoid(a_post * s_post + b_post)
        comb = torch.softmax(a_comb.view(-1, n, n) * s_comb + b_comb.view(n, n), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return post, comb, collapsed

    @staticmethod
    def expand(y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
        """The block's output ``y`` ``[T, H]`` written into the streams ``[T, n, H]``, which are
        mixed by ``comb`` (as ``comb^T h``: stream k takes ``sum_j comb[j, k] h_j``)."""
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


class HyperHead(_Loadable):
    """The final collapse of the streams: ``hc_fn`` ``[n, n H]``, ``hc_base`` ``[n]``,
    ``hc_scale`` ``[1]`` (fp32)."""

    def __init__(self, hidden: int, mult: int, hc_eps: float, norm_eps: float) -> None:
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(mult, mult * hidden), requires_grad=False)
        self.hc_base = nn.Parameter(torch.empty(mult), requires_grad=False)
        self.hc_scale = nn.Parameter(torch.empty(1), requires_grad=False)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:  # [T, n, H] -> [T, H]
        mix = F.linear(_normed(streams, self.norm_eps), self.hc_fn.float())  # [T, n]
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
