"""Python side of ``fused.c``: rotary + K/V store, and SiLU x up, in one call each. Every
function returns None where the kernel does not apply (not CPU, not fp32 / bf16, mixed dtypes,
no kernel built here, autograd); the caller then runs its PyTorch operators."""

from __future__ import annotations

import ctypes
import functools

import torch

from dist_engine.kernels import bind

P, I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "rope_store": (P, I64, I64, I64, I64, I64, P, P, P, P, P, P, P, I64),
    "silu_mul": (P, P, I64, I64, I64),
}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@functools.cache
def _fns() -> dict | None:
    fns = {}
    for op, args in _SIGNATURES.items():
        bound = bind("fused", tuple(((op, dt), f"{op}_{sfx}") for dt, sfx in _SUFFIX.items()), args)
        if bound is None:
            return None
        fns.update(bound)
    return fns


def _fn(op: str, *tensors: torch.Tensor):
    """The kernel for ``op`` when every tensor is a CPU tensor of one supported dtype."""
    fns = _fns()
    dtype = tensors[0].dtype
    if (fns is None or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return None
    return fns.get((op, dtype))


def rope_store(qkv: torch.Tensor, local_num_heads: int, local_num_kv_heads: int, head_dim: int,
               positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor | None:
    """Rotary embedding on q and k of ``qkv`` ``[T, (Hq + 2 Hk) * D]`` (halves rotated, tables
    ``[P, D/2]`` read at ``positions``); K and V stored at cache ``slots`` ``[T]``. Returns
    the rotated q ``[T, Hq, D]``. Shapes are checked; the values of ``positions`` (< P) and
    ``slots`` (< cache slots) are the engine's own and trusted (no per-layer range scan)."""
    fn = _fn("rope_store", qkv, cos, sin, k_cache, v_cache)
    T = qkv.shape[0]
    if (fn is None or qkv.dim() != 2 or qkv.stride(1) != 1 or head_dim % 2
            or qkv.shape[1] != (local_num_heads + 2 * local_num_kv_heads) * head_dim
            or k_cache.shape[1:] != (local_num_kv_heads, head_dim) or v_cache.shape != k_cache.shape
            or cos.shape != sin.shape or cos.shape[1:] != (head_dim // 2,)
            or not (cos.is_contiguous() and sin.is_contiguous() and k_cache.is_contiguous()
                    and v_cache.is_contiguous())
            or positions.dtype != torch.int64 or slots.dtype != torch.int64
            or positions.shape != (T,) or slots.shape != (T,)):
        return None
    positions, slots = positions.contiguous(), slots.contiguous()
    q = torch.empty(T, local_num_heads, head_dim, dtype=qkv.dtype)
    fn(qkv.data_ptr(), qkv.stride(0), T, local_num_heads, local_num_kv_heads, head_dim, positions.data_ptr(),
       cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
       q.data_ptr(), torch.get_num_threads())
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` for ``gate_up`` ``[T, 2 I]`` (gate first): ``[T, I]``."""
    fn = _fn("silu_mul", gate_up)
    if fn is None or gate_up.dim() != 2 or not gate_up.is_contiguous() or gate_up.shape[1] % 2:
        return None
    T, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, inter, dtype=gate_up.dtype)
    fn(gate_up.data_ptr(), out.data_ptr(), T, inter, torch.get_num_threads())
    return out
