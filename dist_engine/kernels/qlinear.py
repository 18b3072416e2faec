"""Python side of ``qlinear.c``: the quantized weight layout, its packer, and the products.

``QWeight`` holds a ``[out, in]`` weight as codes in 64-byte blocks of 16 output rows, one
float scale (and optionally offset) per group of ``group`` inputs of a row:
``W[n, k] = scale[n, k // group] * value(code[n, k]) + offset[n, k // group]``. ``pack``
builds it from codes in plain ``[out, in]`` order; ``dequantize`` inverts it with torch
operators (any device), which also serves devices without the C kernel.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, replace

import torch

from dist_engine.kernels import load

PANEL = 16
U4, S8, E4M3 = 0, 1, 2
KINDS = {"u4": U4, "s8": S8, "e4m3": E4M3}
BLOCK_K = {U4: 8, S8: 4, E4M3: 4}  # inputs per 64-byte block
ACT_BLOCK = 32  # inputs per int8 activation scale


class _QW(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("offsets", ctypes.c_void_p), ("lut", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("kind", ctypes.c_int64), ("scale16", ctypes.c_int64)]


@dataclass(frozen=True)
class QWeight:
    """A quantized ``[out_features, in_features]`` weight in the kernel's layout.

    codes ``[panels, in / block_k, 64]`` uint8; scales / offsets ``[panels, in / group, 16]``
    fp32, or fp16 where every value is exact in fp16 (offsets may be None); lut: 16 int8 values
    U4 codes stand for (None: 0..15); fmt: the source format, for logs; int8_activations: CPU
    products quantize each activation row to int8 per 32 inputs (see qlinear.c)."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    lut: torch.Tensor | None
    out_features: int
    in_features: int
    group: int
    kind: int
    fmt: str = ""
    int8_activations: bool = False  # CPU products quantize activations (VNNI builds only)
    in_perm: torch.Tensor | None = None  # code column j reads input in_perm[j] (act order)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.offsets, self.lut)
                   if t is not None)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> QWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, codes=move(self.codes), scales=move(self.scales),
                       offsets=move(self.offsets), lut=move(self.lut), in_perm=move(self.in_perm))

    @functools.cached_property
    def struct(self) -> _QW:
        """The C view (built once; the tensors it points into live as long as this weight)."""
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return _QW(self.codes.data_ptr(), self.scales.data_ptr(), ptr(self.offsets), ptr(self.lut),
                   self.out_features, self.in_features, self.group, self.kind,
                   int(self.scales.dtype == torch.float16))


def _fits_fp16(*ts: torch.Tensor | None) -> bool:
    return all(t is None or torch.equal(t.half().float(), t) for t in ts)


def pack(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, kind: str,
         lut: torch.Tensor | None = None, fmt: str = "", in_perm: torch.Tensor | None = None) -> QWeight:
    """``codes`` ``[N, K]`` (u4: 0..15; s8: int8; e4m3: FP8 bytes as uint8 or float8_e4m3fn),
    ``scales`` / ``offsets`` ``[N, K / group]`` -> ``QWeight``. E4M3 scales are stored times
    2^8 (the kernel reads each byte as an fp16 2^8 too small)."""
    k_id = KINDS[kind]
    N, K = codes.shape
    groups = scales.shape[1]
    if scales.shape[0] != N or K % groups or (offsets is not None and offsets.shape != scales.shape):
        raise ValueError(f"scales {tuple(scales.shape)} / offsets do not tile codes {tuple(codes.shape)}")
    G, bk = K // groups, BLOCK_K[k_id]
    if K % bk or G % bk:
        raise ValueError(f"{kind} codes need in_features ({K}) and the group ({G}) to be multiples of {bk}")
    P = -(-N // PANEL)
    pad = P * PANEL - N
    if codes.dtype == torch.float8_e4m3fn:
        codes = codes.view(torch.uint8)
    c = codes.to(torch.uint8) if k_id != S8 else codes.to(torch.int8).view(torch.uint8)
    c = torch.cat([c, c.new_zeros(pad, K)]) if pad else c
    if k_id == U4:  # [P, 16, K/8, half, t] -> byte (lo | hi << 4) -> [P, K/8, 16, 4]
        c = c.view(P, PANEL, K // 8, 2, 4)
        c = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 1, 3)
    else:
        c = c.view(P, PANEL, K // 4, 4).permute(0, 2, 1, 3)
    packed_codes = c.reshape(P, K // bk, 64).contiguous()
    scales = scales.float() * (256.0 if k_id == E4M3 else 1.0)
    offsets = None if offsets is None else offsets.float()
    sdtype = torch.float16 if _fits_fp16(scales, offsets) else torch.float32

    def grid(t: torch.Tensor) -> torch.Tensor:  # [N, groups] -> [P, groups, 16]
        t = torch.cat([t, t.new_zeros(pad, groups)]) if pad else t
        return t.view(P, PANEL, groups).transpose(1, 2).contiguous().to(sdtype)

    return QWeight(packed_codes, grid(scales), None if offsets is None else grid(offsets),
                   None if lut is None else lut.to(torch.int8).contiguous(), N, K, G, k_id, fmt,
                   in_perm=None if in_perm is None else in_perm.to(torch.int64).contiguous())


def unpack_codes(qw: QWeight) -> torch.Tensor:
    """The codes' values ``[N, K]`` as fp32 (table applied; E4M3 as its float value / 2^8)."""
    P, nb, _ = qw.codes.shape
    K = qw.in_features
    c = qw.codes.view(P, nb, PANEL, 4)
    if qw.kind == U4:
        c = torch.stack([c & 15, c >> 4], dim=3)  # [P, K/8, 16, half, t]
        c = c.permute(0, 2, 1, 3, 4).reshape(P * PANEL, K)
        v = qw.lut[c.long()].float() if qw.lut is not None else c.float()
    elif qw.kind == S8:
        v = c.view(torch.int8).permute(0, 2, 1, 3).reshape(P * PANEL, K).float()
    else:
        v = c.permute(0, 2, 1, 3).reshape(P * PANEL, K).contiguous().view(torch.float8_e4m3fn).float() / 256.0
    return v[:qw.out_features]


def dequantize(qw: QWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, K]`` in ``dtype``: scale * value + offset, computed in fp32 with torch operators
    (on the weight's device: the product on devices without the C kernel), in the order of the
    code columns (``in_perm`` not undone: products permute x instead)."""
    P, groups = qw.scales.shape[:2]
    grid = lambda t: t.float().transpose(1, 2).reshape(P * PANEL, groups)[:qw.out_features]  # noqa: E731
    v = unpack_codes(qw).view(qw.out_features, groups, qw.group)
    w = v * grid(qw.scales).unsqueeze(-1)
    if qw.offsets is not None:
        w = w + grid(qw.offsets).unsqueeze(-1)
    w = w.view(qw.out_features, qw.in_features)
    return w if dtype == torch.float32 else w.to(dtype)


# ---- the C products --------------------------------------------------------------------------
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGS = (_P, _I64, ctypes.POINTER(_QW), _P, _P, _I64, _I64)


@functools.cache
def _lib():
    lib = load("qlinear")
    if lib is None:
        return None
    for name in ("qlinear_f32", "qlinear_bf16", "qlinear_f32_float", "qlinear_bf16_float",
                 "qlinear_f32_i8", "qlinear_bf16_i8"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(_ARGS), ctypes.c_int
    lib.qdequant_rows.argtypes = [ctypes.POINTER(_QW), _P, _I64, _P]
    lib.qdequant_rows.restype = None
    lib.qlinear_has_i8.restype = ctypes.c_int
    return lib


def available() -> bool:
    return _lib() is not None


def has_int8_activations() -> bool:
    """Whether this machine's build has the integer-activation (VNNI) products: int8
    activations, and the digit path of float activations."""
    lib = _lib()
    return lib is not None and bool(lib.qlinear_has_i8())


def int8_activations_apply(qw: QWeight) -> bool:
    """Whether the int8-activation product takes this weight (U4 / S8 codes, groups of 16 or
    multiples of 32, in_features a multiple of 32)."""
    return (qw.kind in (U4, S8) and qw.in_features % ACT_BLOCK == 0
            and (qw.group == 16 or qw.group % ACT_BLOCK == 0))


def digits_apply(qw: QWeight) -> bool:
    """Whether float-activation products of this weight run as three base-256 digits of each
    activation against the codes (VNNI; fp32-class, see qlinear.c) rather than codes as floats."""
    return has_int8_activations() and int8_activations_apply(qw)


def linear(x: torch.Tensor, qw: QWeight, bias: torch.Tensor | None = None,
           int8_activations: bool = False, float_codes: bool = False) -> torch.Tensor:
    """``x Wᵀ + b`` for CPU ``x`` ``[T, in]`` fp32 / bf16: ``[T, out]`` in x's dtype.
    ``int8_activations``: activations rounded to int8 (W8A8); ``float_codes``: float activations
    through codes turned into floats even where the digit path applies (tests, benchmarks)."""
    lib = _lib()
    dtype = x.dtype
    if x.dim() != 2 or x.shape[1] != qw.in_features or dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"quantized product of in_features {qw.in_features} got input "
                         f"{tuple(x.shape)} {dtype}")
    if qw.in_perm is not None:
        x = x.index_select(1, qw.in_perm)
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        bias = bias.to(dtype).contiguous()
    rows = x.shape[0]
    y = torch.empty(rows, qw.out_features, dtype=dtype)
    if rows:
        suffix = "_i8" if int8_activations else "_float" if float_codes else ""
        name = "qlinear_" + ("f32" if dtype == torch.float32 else "bf16") + suffix
        failed = getattr(lib, name)(x.data_ptr(), x.stride(0), ctypes.byref(qw.struct),
                                    None if bias is None else bias.data_ptr(), y.data_ptr(), rows,
                                    torch.get_num_threads())
        if failed:
            raise MemoryError(f"quantized product: no scratch memory for {rows} rows") if failed == 1 else \
                ValueError("this build has no int8-activation products")
    return y


def gather_rows(qw: QWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` ``[T]`` of the weight as fp32 ``[T, in]`` with torch operators (any device:
    an embedding lookup reads only its rows)."""
    ids = ids.long()
    p, j = ids // PANEL, ids % PANEL
    T, nb = ids.numel(), qw.codes.shape[1]
    c = qw.codes[p].view(T, nb, PANEL, 4)[torch.arange(T, device=ids.device), :, j]  # [T, nb, 4]
    if qw.kind == U4:
        c = torch.stack([c & 15, c >> 4], dim=2).reshape(T, qw.in_features)  # per block: t, then t + 4
        v = qw.lut[c.long()].float() if qw.lut is not None else c.float()
    elif qw.kind == S8:
        v = c.reshape(T, qw.in_features).view(torch.int8).float()
    else:
        v = c.reshape(T, qw.in_features).contiguous().view(torch.float8_e4m3fn).float() / 256.0
    groups = qw.scales.shape[1]
    pick = lambda t: t[p, :, j].float()  # noqa: E731  [T, groups]
    w = v.view(T, groups, qw.group) * pick(qw.scales).unsqueeze(-1)
    if qw.offsets is not None:
        w = w + pick(qw.offsets).unsqueeze(-1)
    return w.view(T, qw.in_features)


def dequantize_rows(qw: QWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` ``[T]`` of the weight as fp32 ``[T, in]`` (CPU, C kernel)."""
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty(ids.numel(), qw.in_features, dtype=torch.float32)
    if ids.numel():
        _lib().qdequant_rows(ctypes.byref(qw.struct), ids.data_ptr(), ids.numel(), out.data_ptr())
    return out
