"""A checkpoint weight kept quantized, read lazily the way layers read dense tensors.

Layers cut their slice out of a checkpoint tensor with ``full[start:stop]`` (output rows) or
``full[:, start:stop]`` (input columns); a ``QuantTensor`` answers the same indexing with a
``GroupQuant`` of just those rows, decoded from the checkpoint's own encoding only then, so a
rank reads and decodes only its shard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dist_engine.quant.groups import GroupQuant


class QuantTensor:
    """``shape`` ``(out, in)`` of the real weight; ``decode(rows)`` -> ``GroupQuant`` of those
    output rows (a slice or an index tensor) over all inputs."""

    dtype = None  # not a torch dtype: layers must take it as quantized, never cast it

    def __init__(self, shape: tuple[int, int], decode: Callable[[slice | torch.Tensor], GroupQuant],
                 fmt: str) -> None:
        self.shape = tuple(int(s) for s in shape)
        self._decode = decode
        self.fmt = fmt

    def __repr__(self) -> str:
        return f"QuantTensor({self.fmt}, shape={self.shape})"

    def __getitem__(self, idx) -> GroupQuant:
        rows, cols = (idx if isinstance(idx, tuple) else (idx, slice(None)))
        if not isinstance(rows, slice) or not isinstance(cols, slice) or (cols.step or 1) != 1:
            raise ValueError(f"{self.fmt} weights are sliced by contiguous rows or columns only")
        start, stop, _ = rows.indices(self.shape[0])
        q = self._decode(slice(start, stop))
        c0, c1, _ = cols.indices(self.shape[1])
        return q.cols(c0, c1)

    def rows(self, index: torch.Tensor) -> GroupQuant:
        """Arbitrary rows (a draft head's vocabulary subset)."""
        return self._decode(index)


def permuted(tensor: QuantTensor, order: torch.Tensor) -> QuantTensor:
    """``tensor`` with its rows reordered: row r of the result is row ``order[r]``."""
    def decode(rows: slice | torch.Tensor) -> GroupQuant:
        return tensor.rows(order[rows])
    return QuantTensor(tensor.shape, decode, tensor.fmt)
