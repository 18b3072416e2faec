"""FP4 (E2M1) weights with block scales: MXFP4 and NVFP4, as codes the engine's kernels take.

An E2M1 code is 4 bits: sign (bit 3), then a 2-bit exponent and a 1-bit mantissa, for the
values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives. Checkpoints pack two codes per byte, the
first element in the low nibble.

- MXFP4 (OCP microscaling): one UE8M0 scale per 32 elements, a byte ``e`` standing for
  ``2^(e - 127)`` (DeepSeek-V4's routed experts, gpt-oss, compressed-tensors
  ``mxfp4-pack-quantized``).
- NVFP4: one E4M3 scale per 16 elements and one fp32 global factor per tensor (ModelOpt
  multiplies by ``weight_scale_2``; compressed-tensors divides by ``weight_global_scale``).

The kernels read a code through a 16-entry table of the doubled values (exact small integers:
0, 1, 2, 3, 4, 6, 8, 12 and negatives), so each block's scale is kept halved. Both scale kinds
and the halving are exact in fp32, so the kernels' values equal the format's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dist_engine.quant.groups import E2M1_DOUBLED, GroupQuant
from dist_engine.quant.lazy import QuantTensor
from dist_engine.quant.packing import unpack_nibbles

E2M1_VALUES = tuple(v / 2 for v in E2M1_DOUBLED)  # code -> value


def e2m1_table() -> torch.Tensor:
    return torch.tensor(E2M1_DOUBLED, dtype=torch.int8)


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes -> ``2^(e - 127)`` fp32 (255, the format's NaN, is refused)."""
    e = e.view(torch.uint8) if e.dtype != torch.uint8 else e
    if bool((e == 255).any()):
        raise ValueError("an MXFP4 scale is NaN (UE8M0 byte 255)")
    return torch.ldexp(torch.ones(e.shape), e.to(torch.int32) - 127)


def mxfp4(packed: torch.Tensor, scales: torch.Tensor, fmt: str = "mxfp4") -> GroupQuant:
    """``packed`` uint8 ``[N, K / 2]``, ``scales`` UE8M0 ``[N, K / 32]`` (uint8, or
    float8_e8m0fnu) -> ``GroupQuant`` (u4 codes through the E2M1 table, groups of 32)."""
    codes = unpack_nibbles(packed.view(torch.uint8))
    if codes.shape[1] != scales.shape[1] * 32:
        raise ValueError(f"{fmt}: {codes.shape[1]} elements per row need {codes.shape[1] // 32} "
                         f"scales, got {scales.shape[1]}")
    return GroupQuant(codes, e8m0_to_float(scales) / 2, None, "u4", e2m1_table(), fmt)


def nvfp4(packed: torch.Tensor, scales: torch.Tensor, multiply: torch.Tensor | None = None,
          divide: torch.Tensor | None = None, fmt: str = "nvfp4") -> GroupQuant:
    """``packed`` uint8 ``[N, K / 2]``, ``scales`` E4M3 ``[N, K / 16]`` times the global
    ``multiply`` (ModelOpt) or over the global ``divide`` (compressed-tensors) -> ``GroupQuant``
    (groups of 16)."""
    codes = unpack_nibbles(packed.view(torch.uint8))
    if codes.shape[1] != scales.shape[1] * 16:
        raise ValueError(f"{fmt}: {codes.shape[1]} elements per row need {codes.shape[1] // 16} "
                         f"scales, got {scales.shape[1]}")
    s = scales.view(torch.float8_e4m3fn).float()
    if multiply is not None:
        s = s * multiply.float().reshape(())
    if divide is not None:
        s = s / divide.float().reshape(())
    return GroupQuant(codes, s / 2, None, "u4", e2m1_table(), fmt)


def dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 ``[N, K / 2]`` codes and ``[N, K / 32]`` UE8M0 scales -> fp32 ``[N, K]``."""
    return mxfp4(packed, scales).dequantize()


# where a packed MXFP4 weight's UE8M0 scales sit beside it: DeepSeek's released naming, then
# transformers' spellings
SCALE_LEAVES = ("scale", "weight_scale_inv", "weight_scale")


def mxfp4_tensor(packed, scales, name: str) -> QuantTensor:
    """A checkpoint's packed MXFP4 weight (lazy ``[N, K / 2]`` bytes) and its lazy UE8M0
    ``[N, K / 32]`` scales as one ``QuantTensor`` ``[N, K]``, decoded per row range."""
    n, half = packed.shape
    if tuple(scales.shape) != (n, half * 2 // 32):
        raise ValueError(f"{name}: MXFP4 weight {tuple(packed.shape)} needs scales {(n, half * 2 // 32)}, "
                         f"got {tuple(scales.shape)}")

    def decode(rows: slice | torch.Tensor) -> GroupQuant:
        if isinstance(rows, slice):
            return mxfp4(packed[rows], scales[rows], "mxfp4")
        return mxfp4(packed[:][rows], scales[:][rows], "mxfp4")

    return QuantTensor((n, half * 2), decode, "mxfp4")


def packed_mxfp4_weights(tensors: dict) -> Iterator[tuple[str, object]]:
    """(name, tensor) with every ``<layer>.weight`` stored as int8/uint8 bytes (two E2M1 codes
    each, DeepSeek-V4's routed experts) and its ``<layer>.scale`` replaced by one MXFP4
    ``QuantTensor``; other tensors unchanged."""
    consumed = set()
    for name, t in tensors.items():
        if not name.endswith(".weight") or t.dtype not in (torch.int8, torch.uint8):
            continue
        stem = name[:-len(".weight")]
        scale = next((f"{stem}.{leaf}" for leaf in SCALE_LEAVES if f"{stem}.{leaf}" in tensors), None)
        if scale is None:
            raise ValueError(f"checkpoint tensor {name!r} is packed FP4 but has no {stem}.scale")
        consumed.update((name, scale))
        yield name, mxfp4_tensor(t, tensors[scale], name)
    yield from ((name, t) for name, t in tensors.items() if name not in consumed)
