"""TurboQuant vector quantization of K/V rows (Zandieh et al., ICLR 2026), the maths.

A row ``x`` (one KV head of one token, ``D`` values) is stored as ``D`` codes of ``b`` bits and
one fp16 scale:

1. rotate: ``y = R x`` with ``R`` a fixed random orthogonal matrix per (layer, KV head), drawn
   from the Haar measure (QR of a seeded Gaussian, signs fixed), so it works for any head size
   (64, 128, MLA's 576) and every coordinate of ``y / |x|`` follows the law of one coordinate of
   a uniform point on the unit sphere in ``D`` dimensions, whatever ``x`` is;
2. quantize each coordinate of ``u = y / |x|`` with the Lloyd-Max quantizer of that law (the
   ``2^b`` centroids minimising its mean squared error; computed once per ``(D, b)``);
3. keep the norm: the scale is ``|x|``, or with norm correction ``|x| / |c|`` (``c`` the centroid
   vector), so that the reconstruction has exactly the norm of ``x``.

Reconstruction ``x^ = scale * R^T c``. The paper bounds the mean squared error of a unit vector by
``(sqrt(3) pi / 2) 4^-b`` (0.0425 at 3 bits, 0.0106 at 4); Lloyd-Max reaches 0.034 / 0.0095 at
``D = 128``. Attention never rotates cached rows back: ``q . x^ = scale (R q) . c`` and
``sum_j p_j v^_j = R^T sum_j p_j scale_j c_j``, so queries are rotated once into each head's
basis, scores and the weighted sum run against codebook values, and the output is rotated back
once (``tq_cache.TurboQuantKV``). The C kernels (``kernels/turboquant.c``) compute the same
thing row by row; this module is the PyTorch version (GPUs, no compiler, and the reference the
kernels are tested against).

Keys are stored centred (``x = k - m``, ``m`` a calibrated mean key; ``tq_cache``) unless the
raw key is the shorter of the two, as an attention sink's key often is: then ``x = k`` and the
scale's sign bit says so. Decoding gives ``R (k^ - m)`` either way (``shift = R m`` is taken off
the rows whose sign bit is set), so every score moves by the same ``q . m``, which softmax
ignores.

Codes are packed in groups of eight: a group takes ``b`` bytes, code ``i`` of the group in bits
``b*i .. b*i + b - 1`` of the group's little-endian word. ``D`` must be a multiple of 8.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

SEED = 0x7E5B0  # rotations are fixed: every rank, restart and prefix-cache hit quantizes alike
BITS = (3, 4)
FP16_MAX = 65504.0
# kv_cache_dtype -> bits per value of (K, V); both sides Lloyd-Max with norm correction (on the
# default model's values, per-row uniform codes err more at 3 bits, about as much at 4 for 2
# more bytes a row: docs/kv_quantization.md)
PRESETS = {"turboquant4": (4, 4), "turboquant3": (3, 3)}


@dataclass(frozen=True)
class TQSpec:
    """How one side (K or V) of a head of ``dim`` values is stored."""

    bits: int
    dim: int
    norm_correction: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"TurboQuant codes are {' or '.join(map(str, BITS))} bits, got {self.bits}")
        if self.dim < 8 or self.dim % 8:
            raise ValueError(f"TurboQuant needs a head size that is a multiple of 8, got {self.dim}")

    @property
    def row_bytes(self) -> int:  # packed codes of one row
        return self.dim * self.bits // 8

    @property
    def bytes_per_row(self) -> int:  # codes and the fp16 scale
        return self.row_bytes + 2


def bytes_per_row(preset: str, head_dim: int, shared: bool) -> int:
    """Bytes of one KV head of one token (K and V rows, or the shared latent's)."""
    k_bits, v_bits = PRESETS[preset]
    k = TQSpec(k_bits, head_dim).bytes_per_row
    return k if shared else k + TQSpec(v_bits, head_dim).bytes_per_row


@functools.cache
def _lloyd_max(dim: int, bits: int, grid: int = 1 << 16, iters: int = 400) -> tuple[tuple, tuple]:
    """(centroids, boundaries) of the Lloyd-Max quantizer of one coordinate of a uniform point
    on the unit sphere in ``dim`` dimensions; its density is proportional to
    ``(1 - t^2)^((dim - 3) / 2)``. Worked out in ``s = t sqrt(dim)`` (unit variance)."""
    lim = min(math.sqrt(dim), 12.0)
    s = np.linspace(-lim, lim, grid)
    w = np.clip(1.0 - s * s / dim, 0.0, None) ** ((dim - 3) / 2)
    w /= w.sum()
    cdf, first_moment = np.cumsum(w), np.cumsum(w * s)
    k = 1 << bits
    c = np.interp((np.arange(k) + 0.5) / k, cdf, s)  # start from the quantiles
    for _ in range(iters):  # boundaries at midpoints, centroids at the conditional means
        cut = np.searchsorted(s, (c[1:] + c[:-1]) / 2)
        mass = np.diff(np.concatenate(([0.0], cdf[cut - 1], [1.0])))
        moment = np.diff(np.concatenate(([0.0], first_moment[cut - 1], [first_moment[-1]])))
        c = moment / mass
    c = (c - c[::-1]) / 2  # exactly symmetric
    scale = 1.0 / math.sqrt(dim)
    return tuple(c * scale), tuple((c[1:] + c[:-1]) / 2 * scale)


def codebook(dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids ``[2^bits]`` and decision boundaries ``[2^bits - 1]`` (fp32, ascending)."""
    c, b = _lloyd_max(dim, bits)
    return torch.tensor(c, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


def rotation(dim: int, layer: int, head: int) -> torch.Tensor:
    """The fixed Haar-random orthogonal ``[dim, dim]`` (fp32) of a layer's global KV head."""
    gen = torch.Generator().manual_seed((SEED * 1_000_003 + layer) * 1_000_003 + head)
    g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(torch.float32)


def rotations(dim: int, layer: int, heads: range) -> torch.Tensor:
    """``[len(heads), dim, dim]``: the rotations of this rank's KV heads (global indices)."""
    return torch.stack([rotation(dim, layer, h) for h in heads])


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., D]`` integer codes -> ``[..., D * bits / 8]`` uint8."""
    *lead, D = codes.shape
    groups = codes.to(torch.int32).view(*lead, D // 8, 8)
    word = (groups << (torch.arange(8, device=codes.device, dtype=torch.int32) * bits)).sum(-1)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32) * 8  # bytes of the word
    return ((word.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).view(*lead, D * bits // 8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., D * bits / 8]`` uint8 -> ``[..., D]`` int64 codes."""
    *lead, C = packed.shape
    b = packed.to(torch.int32).view(*lead, C // bits, bits)
    word = (b << (torch.arange(bits, device=packed.device, dtype=torch.int32) * 8)).sum(-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * bits
    return ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).long().view(*lead, C // bits * 8)


def encode(x: torch.Tensor, rot: torch.Tensor, spec: TQSpec,
           shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[N, H, D]`` and rotations ``[H, D, D]`` -> (codes ``[N, H, row_bytes]`` uint8, scales
    ``[N, H]`` fp16). A zero row gets scale 0 (and reconstructs as zeros). ``shift`` ``[H, D]``
    (keys: the rotated mean ``R m``): each row is stored as ``R x - shift`` unless ``R x`` is
    the shorter, which is stored as it is with its scale's sign bit set."""
    centroids, bounds = (t.to(x.device) for t in codebook(spec.dim, spec.bits))
    y = torch.einsum("hed,nhd->nhe", rot, x.float()).contiguous()  # [N, H, D], each head's basis
    if shift is not None:
        centred = y - shift
        raw = y.square().sum(-1) < centred.square().sum(-1)  # [N, H]
        y = torch.where(raw.unsqueeze(-1), y, centred)
    norm = y.norm(dim=-1, keepdim=True)  # [N, H, 1]
    codes = torch.bucketize(y / norm.clamp_min(torch.finfo(torch.float32).tiny), bounds)
    scale = norm.squeeze(-1)
    if spec.norm_correction:  # the reconstruction gets exactly the row's norm
        scale = scale / centroids[codes].norm(dim=-1)
    scale = scale.clamp_max(FP16_MAX).to(torch.float16)
    return pack(codes, spec.bits), scale if shift is None else torch.where(raw, -scale, scale)


def decode(codes: torch.Tensor, scales: torch.Tensor, spec: TQSpec, dtype: torch.dtype,
           shift: torch.Tensor | None = None) -> torch.Tensor:
    """Rows in their head's rotated basis: ``[..., H, D]`` = |scale| * centroid[code], less
    ``shift`` ``[H, D]`` where the scale's sign bit is set (keys stored uncentred)."""
    centroids = codebook(spec.dim, spec.bits)[0].to(codes.device)
    s = scales.float()
    rows = centroids[unpack(codes, spec.bits)] * s.abs().unsqueeze(-1)
    if shift is not None:
        rows = rows - torch.signbit(s).unsqueeze(-1) * shift
    return rows.to(dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, rot: torch.Tensor, spec: TQSpec,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """Rows back in the original basis, fp32 ``[N, H, D]`` (tests and measurements)."""
    return torch.einsum("hed,nhe->nhd", rot, decode(codes, scales, spec, torch.float32, shift))
