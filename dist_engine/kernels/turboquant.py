"""Python side of ``turboquant.c``: rotation, quantization into the cache, decoding of gathered
rows (CPU, fp32 or bf16 rows). ``available(dtype)`` says whether the kernel runs here; callers
use ``layers/turboquant.py`` (PyTorch) otherwise."""

from __future__ import annotations

import ctypes
import functools

import torch

from dist_engine.kernels import bind

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "rotate": (_P, _I, _P, _I, _I, _I, _I, _P, _I),
    "encode": (_P, _I, _I, _I, _I, _P, _P, _P, _I, _I, _P, _P, _P, _P, _I),
    "gather": (_P, _P, _P, _I, _I, _I, _P, _I, _P, _P, _I),
}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@functools.cache
def _fns(op: str) -> dict | None:
    return bind("turboquant", tuple((dt, f"tq_{op}_{s}") for dt, s in _SUFFIX.items()),
                _SIGNATURES[op], ctypes.c_int)


def available(dtype: torch.dtype) -> bool:
    fns = _fns("rotate")
    return fns is not None and dtype in fns


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x ``[N, ..., D]`` with its per-token part contiguous (any stride between tokens)."""
    inner = x[0] if x.shape[0] else x
    return x if inner.is_contiguous() and x.stride(-1) == 1 else x.contiguous()


def _check(rc: int, op: str) -> None:
    if rc != 0:
        raise ValueError(f"turboquant {op} kernel: head size above 1024 or not a multiple of 8")


def rotate(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """x ``[N, H * G, D]`` -> ``[N, H * G, D]`` (x's dtype): row ``(n, h * G + g)`` times
    ``mats[h]`` ``[D, D]`` on the right (``out = x M``)."""
    N, HG, D = x.shape
    H = mats.shape[0]
    x = _rows(x)
    out = torch.empty(N, HG, D, dtype=x.dtype)
    _check(_fns("rotate")[x.dtype](x.data_ptr(), x.stride(0), out.data_ptr(), N, H, HG // H, D,
                                   mats.data_ptr(), torch.get_num_threads()), "rotate")
    return out


def encode(x: torch.Tensor, rot_t: torch.Tensor, centroids: torch.Tensor, bounds: torch.Tensor,
           bits: int, norm_correction: bool, slots: torch.Tensor, codes: torch.Tensor,
           scales: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Quantize x ``[N, H, D]`` into ``codes`` ``[S, H, D*bits/8]`` / ``scales`` ``[S, H]`` (fp16)
    at ``slots`` ``[N]``; ``rot_t`` ``[H, D, D]`` holds each head's rotation transposed;
    ``shift`` ``[H, D]`` fp32 as in ``layers/turboquant.encode`` (keys: the rotated mean)."""
    N, H, D = x.shape
    x = _rows(x)
    slots = slots.contiguous()
    _check(_fns("encode")[x.dtype](
        x.data_ptr(), x.stride(0), N, H, D, rot_t.data_ptr(), centroids.data_ptr(),
        bounds.data_ptr(), bits, int(norm_correction), None if shift is None else shift.data_ptr(),
        slots.data_ptr(), codes.data_ptr(), scales.data_ptr(), torch.get_num_threads()), "encode")


def gather(codes: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, centroids: torch.Tensor,
           bits: int, dim: int, dtype: torch.dtype, shift: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of ``slots`` (any shape ``[...]``) decoded in their heads' basis:
    ``[..., H, D]`` in ``dtype``; ``shift`` ``[H, D]`` fp32 is taken off the rows whose scale's
    sign bit is set (``layers/turboquant.decode``)."""
    flat = slots.reshape(-1).contiguous()
    H = codes.shape[1]
    out = torch.empty(*slots.shape, H, dim, dtype=dtype)
    _check(_fns("gather")[dtype](codes.data_ptr(), scales.data_ptr(), flat.data_ptr(), flat.numel(),
                                 H, dim, centroids.data_ptr(), bits,
                                 None if shift is None else shift.data_ptr(), out.data_ptr(),
                                 torch.get_num_threads()), "gather")
    return out
