"""One layer's paged K/V storage on one rank, in the model dtype or in FP8 with per-tensor scales.

K and V are ``[num_slots, local_num_kv_heads, head_dim]`` each, slot = block * block_size + offset.
``fp8_e4m3`` stores ``x / scale`` as float8_e4m3fn (one byte per element, no full-precision
copy) and returns ``stored * scale`` in the compute dtype when attention gathers the keys. The
per-layer scales ``k_scale`` / ``v_scale`` map the calibrated absolute maximum onto half of the
format's range (448), so values up to twice what calibration saw are still represented; larger
ones saturate rather than overflow to NaN.

Error bound of ``fp8_e4m3`` (3 mantissa bits): a stored element in the normal range is within
2^-4 (6.25%) of its value relative to itself; below ``2^-6 * scale`` (subnormals) the absolute
error is at most ``2^-10 * scale``; dequantizing into bf16/fp16 adds that format's rounding.
docs/long_context.md has the measured effect on logits.

A layer cache offers ``write``, ``gather``, ``window``, ``attend_paged`` (the C decode kernel) and
``to_cache_basis`` / ``from_cache_basis`` (the basis attention runs in: the model's here, each
KV head's rotated one for ``TurboQuantKV`` in ``layers/tq_cache.py``); its kind
(``kv_cache/kinds.PagedKV``) gives its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_engine.config import KV_CACHE_DTYPES
from dist_engine.kernels import paged_attention as paged_kernel
from dist_engine.layers.turboquant import PRESETS as TQ_PRESETS

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
HEADROOM = 2.0  # calibrated amax maps to FP8_MAX / HEADROOM


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in TQ_PRESETS:
        return torch.uint8  # codes (TurboQuantKV)
    return FP8 if kv_cache_dtype == "fp8_e4m3" else getattr(torch, kv_cache_dtype)


@dataclass
class LayerKV:
    k: torch.Tensor  # [num_slots, local_num_kv_heads, head_dim] in the storage dtype
    v: torch.Tensor
    k_scale: float = 1.0  # FP8 only: stored = x / scale
    v_scale: float = 1.0
    # calibration: when set, write_kv notes the largest |K| and |V| and sums K per head
    # (full-precision caches)
    observe: bool = False
    k_amax: float = 0.0
    v_amax: float = 0.0
    k_sum: torch.Tensor | None = None  # [Hk, D] fp64
    k_count: int = 0

    @classmethod
    def empty(cls, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device, zero_slots: int, scales: tuple[float, float] = (1.0, 1.0),
              shared: bool = False) -> LayerKV:
        """Uninitialised storage (pages are committed as blocks are first written), except the
        first ``zero_slots``: padded key positions gather slot 0 and must never hold NaN.
        ``shared``: V is the same tensor as K (MLA's latent serves as both)."""
        k = torch.empty(num_slots, kv_heads, head_dim, dtype=dtype, device=device)
        v = k if shared else torch.empty_like(k)
        k[:zero_slots].view(torch.uint8 if dtype == FP8 else dtype).zero_()
        v[:zero_slots].view(torch.uint8 if dtype == FP8 else dtype).zero_()
        return cls(k, v, scales[0], scales[0] if shared else scales[1])

    @property
    def shared(self) -> bool:
        return self.v is self.k

    @property
    def is_fp8(self) -> bool:
        return self.k.dtype == FP8

    @property
    def plain(self) -> bool:  # K/V stored as they are: kernels may read and write them directly
        return not self.is_fp8

    def to_cache_basis(self, q: torch.Tensor) -> torch.Tensor:  # stored as computed: no change
        return q

    def from_cache_basis(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def attend_paged(self, q: torch.Tensor, group, scale: float, out: torch.Tensor) -> None:
        """The C decode kernel over this cache for ``group`` (a ``PagedGroup``)."""
        if self.is_fp8:
            paged_kernel.attend_fp8(q, self.k, self.v, self.k_scale, self.v_scale, group, scale, out)
        else:
            paged_kernel.attend(q, self.k, self.v, group, scale, out)

    @property
    def local_num_kv_heads(self) -> int:
        return self.k.shape[1]

    def note(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Calibration: remember the largest |K| and |V| and sum K (every token of the step, so
        that sequence shards, which store different tokens, agree)."""
        if k.numel():
            self.k_amax = max(self.k_amax, k.abs().max().item())
            self.v_amax = max(self.v_amax, v.abs().max().item())
            self.k_sum = k.double().sum(0) + (0 if self.k_sum is None else self.k_sum)
            self.k_count += k.shape[0]

    def calibrated_mean(self) -> torch.Tensor | None:
        """The mean key ``[Hk, D]`` (fp32) seen while observing; None for shared storage (MLA's
        latent is the value too) or when nothing was seen."""
        return None if self.shared or not self.k_count else (self.k_sum / self.k_count).float()

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots [W]; k, v [W, Hk, D] (v ignored when it shares K's storage)
        pairs = ((self.k, k, self.k_scale),) if self.shared else (
            (self.k, k, self.k_scale), (self.v, v, self.v_scale))
        if not self.is_fp8:
            for cache, x, _ in pairs:
                cache.index_copy_(0, slots, x.to(cache.dtype))
            return
        # no fp8 index_copy on every backend: move the bytes
        for cache, x, scale in pairs:
            q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
            cache.view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of ``slots`` (any shape ``[...]``) as ``[..., Hk, D]`` in ``dtype``."""
        flat = slots.reshape(-1)
        shape = (*slots.shape, *self.k.shape[1:])

        def pick(cache: torch.Tensor) -> torch.Tensor:
            # index_select on the flattened slots: 3-4x faster on CPU than advanced indexing;
            # FP8 moves as bytes (no fp8 index_select on every backend)
            if self.is_fp8:
                return cache.view(torch.uint8).index_select(0, flat).view(FP8).view(shape)
            return cache.index_select(0, flat).view(shape)

        k = pick(self.k)
        return self._load(k, k if self.shared else pick(self.v), dtype)

    def window(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the consecutive slots ``[start, start + length)`` as ``[length, Hk, D]`` in
        ``dtype``: views of the cache when it is stored in ``dtype``, no gather."""
        return self._load(self.k[start:start + length], self.v[start:start + length], dtype)

    def _load(self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored K, V -> ``dtype`` (FP8: times the scales); shared storage converts once."""
        k = k.to(dtype) * self.k_scale if self.is_fp8 else k.to(dtype)
        if self.shared:
            return k, k
        return k, (v.to(dtype) * self.v_scale if self.is_fp8 else v.to(dtype))

    def calibrated_scales(self) -> tuple[float, float]:  # (K, V); shared storage uses K's
        """FP8 scales from the maxima seen while observing (1.0 for an all-zero tensor)."""
        return tuple(max(a, 1e-6) * HEADROOM / FP8_MAX if a > 0 else 1.0
                     for a in (self.k_amax, self.v_amax))
