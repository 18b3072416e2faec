"""Python side of ``paged_attention.c``: decode and verification attention over block tables.

``PagedGroup`` is the per-step metadata (built once by ``worker/batch.py``, shared by every
layer); ``attend`` runs one layer. Eligible: CPU tensors, fp32 or bf16 cache in the query's
dtype, separate K and V (not MLA's shared latent), no sequence shards. ``attend_tq`` runs one
layer over a TurboQuant cache (``layers/tq_cache.py``): queries and output in the cache's
rotated basis, K and V read as codes. ``attend_fp8`` reads an FP8 cache (float8_e4m3fn bytes
and a scale per side, ``layers/kv_cache.py``), widening rows as it reads them.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from dist_engine.kernels import bind

_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_float, ctypes.c_int64)


@dataclass
class PagedGroup:
    """Sequences attended by the C kernel (few query tokens each: decode, verification)."""

    q_start: torch.Tensor  # [B] int64: flat index of each sequence's first query token
    q_len: torch.Tensor  # [B] int64: its query tokens (the last q_len positions of its context)
    ctx: torch.Tensor  # [B] int64: context length, the queries' own tokens included
    tables: torch.Tensor  # [B, max_blocks] int64: block ids (padding never read)
    block_size: int
    window: int  # sliding window in tokens, 0 for none
    covers_all: bool  # the group's queries are every token of the step


@functools.cache
def _fns() -> dict | None:
    return bind("paged_attention", ((torch.float32, "paged_attention_f32"),
                                    (torch.bfloat16, "paged_attention_bf16")), _ARGS, ctypes.c_int)


@functools.cache
def _tq_fns() -> dict | None:  # K and V as pointers to TQRows structures
    return bind("paged_attention", ((torch.float32, "paged_attention_tq_f32"),
                                    (torch.bfloat16, "paged_attention_tq_bf16")), _ARGS, ctypes.c_int)


_FP8_ARGS = (*_ARGS[:4], ctypes.c_float, ctypes.c_float, *_ARGS[4:])


@functools.cache
def _fp8_fns() -> dict | None:  # K and V float8_e4m3fn bytes, then their two scales
    return bind("paged_attention", ((torch.float32, "paged_attention_fp8_f32"),
                                    (torch.bfloat16, "paged_attention_fp8_bf16")), _FP8_ARGS, ctypes.c_int)


def available(dtype: torch.dtype) -> bool:
    fns = _fns()
    return fns is not None and dtype in fns


def make_group(seqs, starts: list[int], block_size: int, window: int | None,
               num_tokens: int) -> PagedGroup:
    """Metadata for ``seqs`` (``SeqWork``s, each feeding its last ``len(token_ids)`` positions)."""
    used = [(s.context_len + block_size - 1) // block_size for s in seqs]
    width = max(used)
    tables = [list(s.block_table[:n]) + [0] * (width - n) for s, n in zip(seqs, used)]
    q_len = [len(s.token_ids) for s in seqs]
    return PagedGroup(
        q_start=torch.tensor(starts, dtype=torch.int64),
        q_len=torch.tensor(q_len, dtype=torch.int64),
        ctx=torch.tensor([s.context_len for s in seqs], dtype=torch.int64),
        tables=torch.tensor(tables, dtype=torch.int64),
        block_size=block_size,
        window=window or 0,
        covers_all=sum(q_len) == num_tokens,
    )


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: PagedGroup,
           scale: float, out: torch.Tensor) -> None:
    """Write the group's rows of ``out`` ``[T, Hq, D]`` (contiguous, q's dtype): attention of q
    ``[T, Hq, D]`` over the cache ``[num_slots, Hk, D]`` (same dtype)."""
    T, Hq, D = q.shape
    if not available(q.dtype):
        raise RuntimeError(f"the paged attention kernel is not built for {q.dtype} here")
    if not (q.device.type == k_cache.device.type == out.device.type == "cpu"
            and k_cache.dtype == v_cache.dtype == out.dtype == q.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous()
            and out.shape == q.shape and k_cache.shape == v_cache.shape
            and k_cache.shape[2] == D and Hq % k_cache.shape[1] == 0):
        raise ValueError("paged attention kernel: q, out [T, Hq, D] and contiguous K/V caches "
                         "[slots, Hk, D] must be CPU tensors of one dtype")
    if q.stride(2) != 1 or q.stride(1) != D:
        q = q.contiguous()
    fn = _fns()[q.dtype]
    B, width = g.tables.shape
    rc = fn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
            g.q_start.data_ptr(), g.q_len.data_ptr(), g.ctx.data_ptr(), g.tables.data_ptr(),
            width, B, Hq, k_cache.shape[1], D, g.block_size, g.window, scale,
            torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged attention kernel: out of memory for its score buffers")


def attend_tq(q: torch.Tensor, kv, g: PagedGroup, scale: float, out: torch.Tensor) -> None:
    """``attend`` over a ``TurboQuantKV`` ``kv``: q and ``out`` ``[T, Hq, D]`` (contiguous, q's
    dtype) in the cache's rotated basis (``kv.to_cache_basis``)."""
    T, Hq, D = q.shape
    if not available(q.dtype):
        raise RuntimeError(f"the paged attention kernel is not built for {q.dtype} here")
    if not (q.device.type == out.device.type == "cpu" and out.dtype == q.dtype
            and out.is_contiguous() and out.shape == q.shape and D == kv.head_dim
            and Hq % kv.local_num_kv_heads == 0):
        raise ValueError("paged attention kernel: q, out [T, Hq, D] must be CPU tensors of one "
                         "dtype, D the cache's head size")
    if q.stride(2) != 1 or q.stride(1) != D:
        q = q.contiguous()
    tk, tv = kv.c_rows()
    B, width = g.tables.shape
    rc = _tq_fns()[q.dtype](q.data_ptr(), q.stride(0), ctypes.addressof(tk), ctypes.addressof(tv),
                            out.data_ptr(), g.q_start.data_ptr(), g.q_len.data_ptr(),
                            g.ctx.data_ptr(), g.tables.data_ptr(), width, B, Hq, kv.local_num_kv_heads, D,
                            g.block_size, g.window, scale, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged attention kernel: out of memory for its score buffers")


def attend_fp8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float,
               v_scale: float, g: PagedGroup, scale: float, out: torch.Tensor) -> None:
    """``attend`` over an FP8 cache: K/V ``[num_slots, Hk, D]`` float8_e4m3fn (D a multiple of
    8), each element times its side's scale; q and ``out`` in the model's dtype."""
    T, Hq, D = q.shape
    if not available(q.dtype):
        raise RuntimeError(f"the paged attention kernel is not built for {q.dtype} here")
    if not (q.device.type == k_cache.device.type == out.device.type == "cpu"
            and k_cache.dtype == v_cache.dtype == torch.float8_e4m3fn and out.dtype == q.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous()
            and out.shape == q.shape and k_cache.shape == v_cache.shape
            and k_cache.shape[2] == D and D % 8 == 0 and Hq % k_cache.shape[1] == 0):
        raise ValueError("paged attention kernel: q, out [T, Hq, D] in one dtype and contiguous "
                         "float8_e4m3fn K/V caches [slots, Hk, D] on CPU, D a multiple of 8")
    if q.stride(2) != 1 or q.stride(1) != D:
        q = q.contiguous()
    B, width = g.tables.shape
    rc = _fp8_fns()[q.dtype](q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                             k_scale, v_scale, out.data_ptr(), g.q_start.data_ptr(),
                             g.q_len.data_ptr(), g.ctx.data_ptr(), g.tables.data_ptr(), width, B,
                             Hq, k_cache.shape[1], D, g.block_size, g.window, scale,
                             torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged attention kernel: out of memory for its score buffers")
