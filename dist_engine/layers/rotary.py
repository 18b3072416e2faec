"""Rotary position embedding (HF's non-interleaved "rotate half" layout) with Llama-3 scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
              dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim/2]`` and the attention scale factor for cos/sin, computed
    in ``dtype`` (float32 repeats transformers' arithmetic exactly)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        return torch.where(mid, blended, out), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, dtype)
    if kind == "proportional":
        # Gemma 4's global layers: the first partial_rotary_factor of each half turns at the
        # frequencies a full-width head would give them; the rest get frequency 0 (cos 1,
        # sin 0: passed through unrotated, bit for bit)
        angles = int(scaling.get("partial_rotary_factor", 1.0) * head_dim // 2)
        inv = torch.cat([inv[:angles], torch.zeros(head_dim // 2 - angles, dtype=inv.dtype)])
        return inv / scaling.get("factor", 1.0), 1.0
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, "
                     "llama3, yarn, proportional)")


def _yarn(head_dim: int, theta: float, scaling: dict[str, Any], dtype: torch.dtype
          ) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): dimensions that rotate many times over the original context keep
    their frequency, slow ones are divided by ``factor``, a linear ramp in between; cos/sin are
    scaled by ``0.1 ln(factor) + 1`` (or the mscale ratio DeepSeek configs give)."""
    factor = scaling["factor"]
    old_len = scaling.get("original_max_position_embeddings")
    if old_len is None:
        raise ValueError("yarn rope_scaling needs original_max_position_embeddings in config.json")
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    att = scaling.get("attention_factor")
    if att is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        att = mscale(m) / mscale(m_all) if m and m_all else mscale()

    def dim_for(rotations: float) -> float:  # the dimension that turns `rotations` times
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(fast), dim_for(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=dtype) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (extrapolate), 0: divide by factor
    base = theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    return 1.0 / (factor * base) * (1 - keep) + 1.0 / base * keep, float(att)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k at given absolute positions.

    cos/sin tables are built once in fp32 for ``max_positions`` and indexed per token.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, dtype: torch.dtype) -> None:
        super().__init__()
        inv, mscale = _inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)  # [P, D/2]
        self.register_buffer("cos", (freqs.cos() * mscale).to(dtype), persistent=False)
        self.register_buffer("sin", (freqs.sin() * mscale).to(dtype), persistent=False)
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T]; q [T, Hq, D]; k [T, Hk, D]
        return self.rotate(positions, q), self.rotate(positions, k)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x`` ``[T, H, D]`` (any heads: q and k side by side rotate in one call)."""
        if self._cached is None or self._cached[0] is not positions:
            # every layer of one forward passes the same positions tensor: index once per step
            self._cached = (positions, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        _, cos, sin = self._cached  # [T, 1, D/2] each
        return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class TrailingRotary(nn.Module):
    """RoPE on the last ``rope_dim`` dims of each head with consecutive pairs rotated together
    (DeepSeek-V4's layout: ``[nope | rope]``, pairs (x0, x1), (x2, x3), ...). The cos/sin
    tables are built in fp32 as transformers builds them (``position * inv_freq``), rounded to
    the model dtype, and the rotation runs in fp32. ``inverse`` rotates by -position (V4 undoes
    the keys' rotation on the attention output, since K is also V)."""

    def __init__(self, rope_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, dtype: torch.dtype) -> None:
        super().__init__()
        inv, mscale = _inv_freq(rope_dim, theta, scaling, torch.float32)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv[None, :]  # [P, rd/2]
        self.register_buffer("cos", (freqs.cos() * mscale).to(dtype), persistent=False)
        self.register_buffer("sin", (freqs.sin() * mscale).to(dtype), persistent=False)
        self.rope_dim = rope_dim

    def forward(self, positions: torch.Tensor, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``x`` ``[T, H, D]`` (or ``[T, D]``) at ``positions`` ``[T]``."""
        cos, sin = self.cos[positions].float(), self.sin[positions].float()  # [T, rd/2]
        if x.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if inverse:
            sin = -sin
        rd = self.rope_dim
        rope = x[..., -rd:].float()
        x1, x2 = rope[..., 0::2], rope[..., 1::2]
        rotated = torch.stack((x1 * cos + -x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((x[..., :-rd], rotated.to(x.dtype)), dim=-1)
