"""Python side of ``rms_norm.c``: one call per RMSNorm (or residual add + RMSNorm) on CPU fp32 /
bf16 rows."""

from __future__ import annotations

import ctypes
import functools

import torch

from dist_engine.kernels import bind

P, I64 = ctypes.c_void_p, ctypes.c_int64
_ARGS = (P, I64, P, P, I64, I64, ctypes.c_float, I64)
_ADD_ARGS = (P, P, P, P, P, I64, I64, ctypes.c_float, I64)


@functools.cache
def _fns() -> dict | None:
    return bind("rms_norm", ((torch.float32, "rms_norm_f32"), (torch.bfloat16, "rms_norm_bf16")),
                _ARGS)


@functools.cache
def _add_fns() -> dict | None:
    return bind("rms_norm", ((torch.float32, "add_rms_norm_f32"),
                             (torch.bfloat16, "add_rms_norm_bf16")), _ADD_ARGS)


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


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x + delta, RMSNorm(x + delta))`` for ``[T, H]`` rows, as new tensors; None where the
    kernel does not apply."""
    fns = _add_fns()
    fn = fns.get(x.dtype) if fns else None
    if (fn is None or x.device.type != "cpu" or x.dim() != 2 or x.shape != delta.shape
            or delta.dtype != x.dtype or weight.dtype != x.dtype or weight.shape != x.shape[1:]
            or not (x.is_contiguous() and delta.is_contiguous() and weight.is_contiguous())
            or (torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad))):
        return None
    total, out = torch.empty_like(x), torch.empty_like(x)
    fn(x.data_ptr(), delta.data_ptr(), weight.data_ptr(), total.data_ptr(), out.data_ptr(),
       x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return total, out
