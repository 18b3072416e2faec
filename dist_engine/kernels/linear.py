"""Python side of ``linear.c``: CPU products from a weight repacked into 16-row panels."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from dist_engine.kernels import bind

PANEL = 16
_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


@functools.cache
def _fns() -> dict | None:
    # keyed by (activation dtype, weight dtype)
    return bind("linear", (((torch.float32, torch.float32), "linear_f32"),
                           ((torch.bfloat16, torch.bfloat16), "linear_bf16"),
                           ((torch.float32, torch.bfloat16), "linear_f32_bf16w"),
                           ((torch.float32, torch.float16), "linear_f32_f16w")), _ARGS, ctypes.c_int)


@dataclass(frozen=True)
class PanelWeight:
    """A ``[out_features, in_features]`` weight as ``[ceil(out / 16), in, 16]`` panels."""

    panels: torch.Tensor
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.panels.numel() * self.panels.element_size()


def pack(weight: torch.Tensor, dtype: torch.dtype | None = None) -> PanelWeight | None:
    """``weight`` in the kernel's layout, or None where the kernel does not apply (not CPU,
    not fp32 / bf16, no kernel built here). Written in one copy: loading holds the dense weight
    and its panels at once, nothing more. ``dtype``: the panels' dtype when not the weight's
    (bf16 or fp16 panels of an fp32 weight serve fp32 activations at half the bytes)."""
    fns = _fns()
    dtype = dtype or weight.dtype
    # panels for activations of the weight's dtype, or 16-bit panels for fp32 activations
    if (fns is None or weight.device.type != "cpu" or weight.dim() != 2
            or (weight.dtype, dtype) not in fns):
        return None
    n, k = weight.shape
    packed = PanelWeight(torch.zeros(-(-n // PANEL), k, PANEL, dtype=dtype), n)
    pack_into(packed, weight)
    return packed


def pack_into(packed: PanelWeight, weight: torch.Tensor) -> None:
    """Rewrite ``packed``'s panels in place from ``weight`` (its shape): an expert cache slot
    takes another expert's weights without new memory."""
    n, k = packed.out_features, packed.panels.shape[1]
    if tuple(weight.shape) != (n, k):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit panels of a [{n}, {k}] weight")
    full, tail = divmod(n, PANEL)
    w = weight.detach().to(packed.panels.dtype)
    if tail:  # the last, partial panel through a zero-padded copy of its rows (< 16 rows)
        last = torch.zeros(PANEL, k, dtype=w.dtype)
        last[:tail] = w[full * PANEL:]
        _fill(packed.panels[full:], last)
    _fill(packed.panels[:full], w[:full * PANEL])


def _fill(panels: torch.Tensor, rows: torch.Tensor) -> None:
    """``panels`` ``[P, K, 16]`` from ``rows`` ``[16 P, K]``; bf16 panels pair-interleaved
    (the 32-bit word j of a k holds rows j and j + 8)."""
    P, K = panels.shape[:2]
    if panels.dtype == torch.bfloat16:  # [P, 2, 8, K] -> [P, K, 8, 2]
        panels.view(P, K, PANEL // 2, 2).copy_(rows.view(P, 2, PANEL // 2, K).permute(0, 3, 2, 1))
    else:
        panels.copy_(rows.view(P, PANEL, K).transpose(1, 2))


def linear(x: torch.Tensor, weight: PanelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` for ``x`` ``[T, in]`` (the panels' dtype, or fp32 against bf16 panels):
    ``[T, out]`` in x's dtype."""
    dtype = x.dtype
    fn = _fns().get((dtype, weight.panels.dtype))
    if fn is None or x.dim() != 2 or x.shape[1] != weight.panels.shape[1]:
        raise ValueError(f"packed {weight.panels.dtype} product of in_features "
                         f"{weight.panels.shape[1]} got input {tuple(x.shape)} {x.dtype}")
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        bias = bias.to(dtype).contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    y = torch.empty(rows, weight.out_features, dtype=dtype)
    if rows:
        failed = fn(x.data_ptr(), x.stride(0), weight.panels.data_ptr(),
                    None if bias is None else bias.data_ptr(), y.data_ptr(), rows,
                    weight.out_features, x.shape[1], torch.get_num_threads())
        if failed:
            raise MemoryError(f"linear kernel: no memory for a {rows} x {x.shape[1]} fp32 copy")
    return y
