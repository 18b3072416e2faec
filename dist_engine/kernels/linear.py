"""Python side of ``linear.c``: CPU products from a weight repacked into 16-row panels."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from dist_engine.kernels import bind

PANEL = 16
# within one k of a bf16 panel: rows 0, 8, 1, 9, ..., 7, 15 (see linear.c)
_BF16_ORDER = torch.tensor([j // 2 + (PANEL // 2) * (j % 2) for j in range(PANEL)])
_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


@functools.cache
def _fns() -> dict | None:
    fns = bind("linear", ((torch.float32, "linear_f32"),), _ARGS)
    bf16 = bind("linear", ((torch.bfloat16, "linear_bf16"),), _ARGS, ctypes.c_int)
    return None if fns is None or bf16 is None else {**fns, **bf16}


@dataclass(frozen=True)
class PanelWeight:
    """A ``[out_features, in_features]`` weight as ``[ceil(out / 16), in, 16]`` panels."""

    panels: torch.Tensor
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.panels.numel() * self.panels.element_size()


def pack(weight: torch.Tensor) -> PanelWeight | None:
    """``weight`` in the kernel's layout, or None where the kernel does not apply (not CPU,
    not fp32 / bf16, no kernel built here)."""
    fns = _fns()
    if fns is None or weight.device.type != "cpu" or weight.dtype not in fns or weight.dim() != 2:
        return None
    n, k = weight.shape
    padded = torch.zeros((n + PANEL - 1) // PANEL * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight.detach()
    panels = padded.view(-1, PANEL, k)  # [P, 16, K]
    if weight.dtype == torch.bfloat16:
        panels = panels[:, _BF16_ORDER]
    return PanelWeight(panels.transpose(1, 2).contiguous(), n)  # [P, K, 16]


def linear(x: torch.Tensor, weight: PanelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` for ``x`` ``[T, in]`` (the weight's dtype): ``[T, out]``."""
    dtype = weight.panels.dtype
    if x.dtype != dtype or x.dim() != 2 or x.shape[1] != weight.panels.shape[1]:
        raise ValueError(f"packed {dtype} product of in_features {weight.panels.shape[1]} got "
                         f"input {tuple(x.shape)} {x.dtype}")
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        bias = bias.to(dtype).contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    y = torch.empty(rows, weight.out_features, dtype=dtype)
    if rows:
        failed = _fns()[dtype](x.data_ptr(), x.stride(0), weight.panels.data_ptr(),
                               None if bias is None else bias.data_ptr(), y.data_ptr(), rows,
                               weight.out_features, x.shape[1], torch.get_num_threads())
        if failed:
            raise MemoryError(f"linear kernel: no memory for a {rows} x {x.shape[1]} fp32 copy")
    return y
