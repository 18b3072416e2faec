"""One layer's paged K/V at 3-4 bits per value: TurboQuant codes and fp16 scales (``--kv-cache-dtype
turboquant4 | turboquant3``).

Each row (one KV head of one token) is stored as ``head_dim`` codes and one fp16 scale
(``layers/turboquant.py``): ``turboquant4`` takes 4-bit codes for K and V, 34 bytes per row at
``head_dim`` 64 against 128 in bf16 (3.8x fewer); ``turboquant3`` 3-bit codes, 26 bytes (4.9x).
The rotation and the codebook depend on nothing but the layer, the KV head and the head size.
Keys are centred first: a per-(layer, KV head) mean key, calibrated once at start-up by one
pseudo-random prefill (as FP8 scales are), is subtracted before quantizing and never added back.
Softmax does not change when every score of a query moves by the same ``q . mean``, so attention
is unchanged, while the quantization error, proportional to the stored row's norm, shrinks: the
keys of the default model are ~80% mean by norm, and centring lowers the KL divergence of its
next-token distribution from the exact cache's by about 40% at 4 bits (docs/kv_quantization.md). The
log-sum-exp moves by ``q . mean`` on every sequence shard alike (same calibration on every rank),
so partial outputs merge as before. A shared latent (MLA: the value is the key) is not centred.
A key that is shorter than its centred form (an attention sink's, typically: 88% of first
tokens, 2% of all keys on the default model) is stored as it is, its scale's sign bit set; its
decoded row has the rotated mean taken off, so its score moves by the same ``q . mean`` as the
others'. The choice is the row's alone, so it costs no byte and no rank or restart disagrees;
on the default model it lifts teacher-forced agreement with the exact cache from 0.868 to 0.904
at 4 bits (KL 0.047 to 0.032) and from 0.776 to 0.807 at 3 (tests/test_turboquant_default_model.py).
Rotation, codebook and mean are the same on every rank holding a head, so every rank, restart
and prefix-cache hit stores a token alike.

Attention reads the codes directly, in each KV head's rotated basis: ``to_cache_basis`` rotates
the queries (those of a KV head's query heads by its rotation), ``gather`` / ``window`` return
rows as ``scale * centroid[code]`` without rotating them back, and ``from_cache_basis`` rotates
the attention output back. Scores and softmax are therefore those of the dequantized cache, and
partial outputs over sequence shards merge by log-sum-exp as before (the merge is linear, the
rotation too). On CPU the C kernels quantize, decode and rotate row by row
(``kernels/turboquant.c``) and the decode kernel scores codes in its inner loop
(``kernels/paged_attention.c``); elsewhere the same maths runs in PyTorch.

The interface is ``LayerKV``'s (``write``, ``gather``, ``window``, ``local_num_kv_heads``, ``shared``,
``bytes_per_token``) plus the two basis changes, so a layer (or a cache kind) can hold either.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from dist_engine.kernels import paged_attention as paged_kernel
from dist_engine.kernels import turboquant as tq_kernel
from dist_engine.layers import turboquant as tq


class TQRows(ctypes.Structure):  # kernels/tq.h
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("centroids", ctypes.c_void_p), ("bits", ctypes.c_int64), ("row_bytes", ctypes.c_int64),
                ("shift", ctypes.c_void_p)]


@dataclass
class _Side:
    """K or V of the layer: codes ``[num_slots, Hk, row_bytes]`` uint8, scales ``[num_slots,
    Hk]`` fp16, and the codebook of its spec."""
    spec: tq.TQSpec
    codes: torch.Tensor
    scales: torch.Tensor
    centroids: torch.Tensor  # [2^bits] fp32, on the cache's device
    bounds: torch.Tensor  # [2^bits - 1]
    # [Hk, D] fp32: R m, taken off the rows stored uncentred (sign bit of the scale); None: no
    # row is (values, and keys without a calibrated mean)
    shift: torch.Tensor | None = None

    @classmethod
    def empty(cls, spec: tq.TQSpec, num_slots: int, kv_heads: int, device: torch.device,
              zero_slots: int) -> _Side:
        codes = torch.empty(num_slots, kv_heads, spec.row_bytes, dtype=torch.uint8, device=device)
        scales = torch.empty(num_slots, kv_heads, dtype=torch.float16, device=device)
        scales[:zero_slots].zero_()  # padded keys read slot 0: it must decode to zeros, not NaN
        c, b = tq.codebook(spec.dim, spec.bits)
        return cls(spec, codes, scales, c.to(device), b.to(device))

    def c_rows(self) -> TQRows:
        return TQRows(self.codes.data_ptr(), self.scales.data_ptr(), self.centroids.data_ptr(),
                      self.spec.bits, self.spec.row_bytes,
                      None if self.shift is None else self.shift.data_ptr())


class TurboQuantKV:
    observe = False  # calibration observes exact caches (LayerKV), never these
    is_fp8 = False
    plain = False  # K/V are not stored as they are (no fused rotary + store, no plain kernel)
    rotated = True  # attention runs in the rotated basis (to_cache_basis / from_cache_basis)

    def __init__(self, k: _Side, v: _Side, rot: torch.Tensor, k_mean: torch.Tensor | None) -> None:
        self.k, self.v = k, v
        self.rot = rot  # [Hk, D, D] fp32: a row's codes are those of R x
        self.rot_t = rot.transpose(1, 2).contiguous()  # R^T, for the kernels' x M products
        self.k_mean = k_mean  # [Hk, D] fp32 subtracted from keys before quantizing; None: not centred
        if k_mean is not None:
            k.shift = torch.einsum("hed,hd->he", rot, k_mean).contiguous()  # [Hk, D] R m
        self._c_rows: tuple[TQRows, TQRows] | None = None

    @classmethod
    def empty(cls, preset: str, num_slots: int, kv_heads: int, head_dim: int,
              device: torch.device, zero_slots: int, layer: int, head_start: int,
              shared: bool = False, k_mean: torch.Tensor | None = None) -> TurboQuantKV:
        """Uninitialised codes (pages are committed as blocks are first written), zero scales in
        the first ``zero_slots``. ``layer`` and ``head_start`` (this rank's first global KV head)
        pick the rotations, so ranks holding the same head (TP replicas, DCP) agree.
        ``shared``: V is K (MLA's latent); K's quantizer serves both. ``k_mean`` ``[Hk, D]``:
        the calibrated mean key (``LayerKV.calibrated_mean``), or None for none."""
        k_bits, v_bits = tq.PRESETS[preset]
        k = _Side.empty(tq.TQSpec(k_bits, head_dim), num_slots, kv_heads, device, zero_slots)
        v = k if shared else _Side.empty(tq.TQSpec(v_bits, head_dim), num_slots, kv_heads, device,
                                        zero_slots)
        rot = tq.rotations(head_dim, layer, range(head_start, head_start + kv_heads)).to(device)
        if k_mean is not None and shared:
            raise ValueError("a shared K/V latent cannot be centred (its values need the mean)")
        return cls(k, v, rot, None if k_mean is None else k_mean.to(device, torch.float32))

    @staticmethod
    def bytes_per_token(preset: str, kv_heads: int, head_dim: int, shared: bool) -> int:
        return kv_heads * tq.bytes_per_row(preset, head_dim, shared)

    def nbytes(self) -> int:
        """Bytes allocated (codes and scales; the rotations and codebooks are not per token)."""
        sides = (self.k,) if self.shared else (self.k, self.v)
        return sum(s.codes.nbytes + s.scales.nbytes for s in sides)

    @property
    def shared(self) -> bool:
        return self.v is self.k

    @property
    def local_num_kv_heads(self) -> int:
        return self.k.codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.spec.dim

    def _kernel(self, dtype: torch.dtype) -> bool:
        return self.k.codes.device.type == "cpu" and tq_kernel.available(dtype)

    # ---- storage ----------------------------------------------------------------------------
    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots [W]; k, v [W, Hk, D] (v ignored when it shares K's storage)
        # keys with a calibrated mean: centred in the rotated basis (less K's shift, R m) unless
        # shorter as they are (then flagged by the scale's sign bit)
        pairs = ((self.k, k),) if self.shared else ((self.k, k), (self.v, v))
        for side, x in pairs:
            if self._kernel(x.dtype):
                tq_kernel.encode(x, self.rot_t, side.centroids, side.bounds, side.spec.bits,
                                 side.spec.norm_correction, slots, side.codes, side.scales, side.shift)
            else:
                codes, scales = tq.encode(x, self.rot, side.spec, side.shift)
                side.codes.index_copy_(0, slots, codes)
                side.scales.index_copy_(0, slots, scales)

    def _decode(self, side: _Side, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self._kernel(dtype):
            return tq_kernel.gather(side.codes, side.scales, slots, side.centroids, side.spec.bits,
                                    side.spec.dim, dtype, side.shift)
        flat = slots.reshape(-1)
        rows = tq.decode(side.codes.index_select(0, flat), side.scales.index_select(0, flat),
                         side.spec, dtype, side.shift)  # [N, Hk, D]
        return rows.view(*slots.shape, *rows.shape[1:])

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of ``slots`` (any shape ``[...]``) as ``[..., Hk, D]`` in ``dtype``, in each
        head's rotated basis."""
        k = self._decode(self.k, slots, dtype)
        return k, (k if self.shared else self._decode(self.v, slots, dtype))

    def window(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the consecutive slots ``[start, start + length)``, ``[length, Hk, D]``."""
        return self.gather(torch.arange(start, start + length, device=self.k.codes.device), dtype)

    # ---- the attention basis ---------------------------------------------------------------
    def _rotate(self, x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
        # x [T, Hq, D]: the Hq / Hk query heads of KV head h (adjacent) through mats[h]
        if self._kernel(x.dtype) and x.device.type == "cpu":
            return tq_kernel.rotate(x, mats)
        T, Hq, D = x.shape
        xs = x.reshape(T, self.local_num_kv_heads, Hq // self.local_num_kv_heads, D).float()
        return torch.einsum("thgd,hde->thge", xs, mats).reshape(T, Hq, D).to(x.dtype)

    def to_cache_basis(self, q: torch.Tensor) -> torch.Tensor:
        """Queries ``[T, Hq, D]`` -> ``R q`` per KV head (scores against ``gather``'s rows are
        those against the dequantized keys)."""
        return self._rotate(q, self.rot_t)

    def from_cache_basis(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output ``[T, Hq, D]`` over ``gather``'s values -> ``R^T out``."""
        return self._rotate(out, self.rot)

    def c_rows(self) -> tuple[TQRows, TQRows]:
        """K and V as the C decode kernel reads them (the tensors never move)."""
        if self._c_rows is None:
            self._c_rows = (self.k.c_rows(), self.v.c_rows())
        return self._c_rows

    def attend_paged(self, q: torch.Tensor, group, scale: float, out: torch.Tensor) -> None:
        """The C decode kernel for ``group`` (a ``PagedGroup``): q and out in the rotated basis."""
        paged_kernel.attend_tq(q, self, group, scale, out)
