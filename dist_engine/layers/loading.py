"""The one copy every layer's ``load`` uses: shapes must match exactly (``copy_`` would
broadcast a wrong-sized tensor silently)."""

from __future__ import annotations

import torch


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"expected a slice of shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src)
