"""Unpacking sub-byte codes from the integer words checkpoints store them in."""

from __future__ import annotations

import torch


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``words`` int32 with ``32 / bits`` codes each, packed along ``dim`` -> uint8 codes with
    that dim ``32 / bits`` times longer. Code i of a word sits at bits ``[bits * i, bits * (i+1))``
    (little-endian); ``order``: position j of the unpacked run takes code ``order[j]`` (AWQ's
    interleaved order)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = words.to(torch.int32).movedim(dim, -1).unsqueeze(-1)  # [..., n, 1]
    codes = ((w >> shifts) & ((1 << bits) - 1)).to(torch.uint8)  # [..., n, per]
    if order is not None:
        codes = codes[..., list(order)]
    codes = codes.reshape(*codes.shape[:-2], codes.shape[-2] * per)
    return codes.movedim(-1, dim)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., n]`` holding two 4-bit codes each (low nibble first) -> ``[..., 2n]``."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
