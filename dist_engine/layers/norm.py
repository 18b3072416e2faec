"""RMSNorm, computed in fp32 as Hugging Face does."""

from __future__ import annotations

import torch
from torch import nn

from dist_engine.kernels.rms_norm import add_rms_norm, rms_norm
from dist_engine.layers.elementwise import rowwise
from dist_engine.layers.loading import copy_checked


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.use_kernel = True  # a switch for A/B checks

    def load(self, which: str, full, shard_id: object = None) -> None:
        copy_checked(self.weight.data, full[:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if self.use_kernel:  # CPU fp32 / bf16: one C call (kernels/rms_norm.c), same arithmetic
            y = rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y.view(x.shape)
        if x.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # 16-bit: normalise in fp32, round, then scale, as Hugging Face does (one fused
        # normalisation instead of five operators: each is a kernel launch on a GPU)
        return self.weight * torch.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))``: a residual add and the norm after it, one C call
        on CPU (kernels/rms_norm.c) with the add rounded as PyTorch rounds it."""
        if self.use_kernel:
            both = add_rms_norm(x, delta, self.weight, self.eps)
            if both is not None:
                return both
        x = x + delta
        return x, self(x)


class Fp32RMSNorm(RMSNorm):
    """RMSNorm whose weight stays fp32 and scales in fp32 before one rounding to the input's
    dtype (DeepSeek-V4 keeps its norms in fp32 whatever the model dtype)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if x.dtype == torch.float32:
            return super().forward(x)
        return (self.weight * torch.rms_norm(x.float(), (x.shape[-1],), None, self.eps)).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` over the last dim, the factor computed in fp32 and rounded to x's dtype."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class OffsetRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint stores ``w`` for a scale of ``1 + w`` (Qwen3.5's zero-centred
    norm, initialised to zeros). The offset is folded in once at load, in fp32, so the forward
    pass (and its C kernel) is the plain one: ``norm(x) * (1 + w)``."""

    def load(self, which: str, full, shard_id: object = None) -> None:
        copy_checked(self.weight.data, (full[:].float() + 1.0).to(self.weight.dtype))


class GatedRMSNorm(RMSNorm):
    """Gated DeltaNet's output norm (plain weight): ``(w * norm(x)) * silu(z)``, normalised in
    fp32 and rounded to the model dtype before the scale, the gate applied in fp32."""

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # [N, dim] each
        normed = torch.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return ((self.weight * normed).float() * rowwise(torch.nn.functional.silu, z.float())).to(x.dtype)
