"""Python side of ``rms_norm.c``: one call per RMSNorm on CPU fp32 / bf16 rows."""

from __future__ import annotations

import ctypes
import functools

import torch

from dist_engine.kernels import bind

_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_float, ctypes.c_int64)


@functools.cache
def _fns() -> dict | None:
    return bind("rms_norm", ((torch.float32, "rms_norm_f32"), (torch.bfloat16, "rms_norm_bf16")),
                _ARGS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``x`` ``[..., H]`` normalised (a new contiguous tensor), or None where the kernel does
    not apply (not CPU, another dtype, rows not evenly strided, no kernel built)."""
    fns = _fns()
    fn = fns.get(x.dtype) if fns else None
    if (fn is None or x.device.type != "cpu" or weight.dtype != x.dtype or x.stride(-1) != 1
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    H = x.shape[-1]
    if x.dim() != 2:
        if not x.is_contiguous():
            return None
        x = x.view(-1, H)
    out = torch.empty(x.shape, dtype=x.dtype)
    fn(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), x.shape[0], H, eps,
       torch.get_num_threads())
    return out
