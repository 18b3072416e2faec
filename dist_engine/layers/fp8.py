"""FP8 block-scaled weights, as DeepSeek-V3 ships them: ``weight`` in float8_e4m3fn plus
``weight_scale_inv``, one fp32 multiplier per ``[block_rows x block_cols]`` tile (128 x 128),
so the real weight is ``weight[i, j] * scale_inv[i // br, j // bc]``.

A quantized linear layer keeps its rank's slice in FP8 and, instead of the tile grid, one scale
row per local weight row: ``[local_out, local col blocks]``. That makes TP slices that do not
start on a tile boundary (and gate/up stacked in one weight) exact: each local row copies the
grid row of its global row, each local column reads the grid column of its global column. The
weight is dequantized per call, for that layer only, so memory holds FP8 weights at rest.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn


class CheckpointFormatError(ValueError):
    """A checkpoint tensor of the right shape but the wrong encoding (dtype, scale grid)."""


def make_fp8(layer: nn.Module, block: tuple[int, int], in_start: int, local_in: int) -> None:
    """Turn ``layer`` (a column/row-parallel linear just built) into its FP8 form."""
    br, bc = block
    first, last = in_start // bc, (in_start + local_in - 1) // bc
    layer.block = block
    layer.col_first = first
    layer.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=FP8), requires_grad=False)
    layer.weight_scale_inv = nn.Parameter(torch.empty(layer.weight.shape[0], last - first + 1),
                                          requires_grad=False)
    # local column ranges of each local column block (the first and last may be partial tiles)
    edges = [0] + [b * bc - in_start for b in range(first + 1, last + 1)] + [local_in]
    layer.col_ranges = list(zip(edges[:-1], edges[1:]))


def load_scale_rows(layer: nn.Module, full, row_start: int, rows: int, dst: int) -> None:
    """Scales of global weight rows ``[row_start, row_start + rows)`` from the tile grid ``full``
    (a tensor or lazy slice ``[ceil(out / br), ceil(in / bc)]``) into local rows ``dst...``."""
    br, _ = layer.block
    g0, g1 = row_start // br, (row_start + rows - 1) // br + 1
    ncols = layer.weight_scale_inv.shape[1]
    grid = full[g0:g1, layer.col_first:layer.col_first + ncols]  # the tiles this slice touches
    if tuple(grid.shape) != (g1 - g0, ncols):
        raise CheckpointFormatError(f"weight_scale_inv grid {tuple(full.shape)} does not cover rows "
                         f"[{row_start}, {row_start + rows}) in blocks of {layer.block}")
    index = (row_start + torch.arange(rows)) // br - g0
    layer.weight_scale_inv.data[dst:dst + rows] = grid.float()[index]


def dequantized(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight in ``dtype``, ``[local_out, local_in]``, computed now: one fp32 copy
    scaled in place tile column by tile column (plus the cast when ``dtype`` is narrower)."""
    w = layer.weight.to(torch.float32)
    scale = layer.weight_scale_inv
    for b, (c0, c1) in enumerate(layer.col_ranges):
        w[:, c0:c1].mul_(scale[:, b:b + 1])
    return w if dtype == torch.float32 else w.to(dtype)
