"""compressed-tensors checkpoints (llm-compressor's output, ``quant_method:
"compressed-tensors"``): the weight side of each scheme, activations left in the model dtype.

| format | tensors per layer | weight |
|---|---|---|
| pack-quantized | ``weight_packed`` int32 ``[N, K * b / 32]``, ``weight_scale`` ``[N, K / G]`` (or ``[N, 1]``), ``weight_shape``, asymmetric: ``weight_zero_point`` int32 packed along N, actorder: ``weight_g_idx`` | ``s * (q - z)``, q stored + 2^(b-1) |
| int- / naive-quantized | ``weight`` int8, ``weight_scale`` (+ ``weight_zero_point``) | ``s * (q - z)`` |
| float-quantized | ``weight`` FP8 E4M3, ``weight_scale`` ``[N, 1]``, ``[1]``, ``[N, K / G]`` or blocks | ``s * q`` |
| nvfp4-pack-quantized | ``weight_packed`` uint8 ``[N, K / 2]``, ``weight_scale`` E4M3 per 16, ``weight_global_scale`` | ``q * s / global`` |
| mxfp4-pack-quantized | ``weight_packed`` uint8, ``weight_scale`` UE8M0 per 32 | ``q * 2^(e - 127)`` |

Static activation scales (``input_scale``, ``input_global_scale``...) are read and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_engine.quant import fp4
from dist_engine.quant.groups import INT4_SIGNED, GroupQuant
from dist_engine.quant.lazy import QuantTensor
from dist_engine.quant.packing import unpack_int32

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized",
           "nvfp4-pack-quantized", "mxfp4-pack-quantized", "dense")
PARTS = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
         "weight_g_idx", "weight_global_scale", "input_global_scale", "input_scale", "input_zero_point")


@dataclass(frozen=True)
class Config:
    formats: tuple[str, ...]
    method: str = "compressed-tensors"

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        groups = raw.get("config_groups") or {}
        formats = {g.get("format") or raw.get("format") for g in groups.values()} or {raw.get("format")}
        for name, group in groups.items():
            fmt = group.get("format") or raw.get("format")
            if fmt not in FORMATS:
                raise ValueError(f"compressed-tensors format {fmt!r} (group {name}) is not supported "
                                 f"(supported: {', '.join(FORMATS)})")
            w = group.get("weights") or {}
            if w and (w.get("type"), w.get("num_bits")) not in (("int", 4), ("int", 8), ("float", 8), ("float", 4)):
                raise ValueError(f"compressed-tensors weights of type {w.get('type')} with "
                                 f"{w.get('num_bits')} bits (group {name}) are not supported")
        if raw.get("sparsity_config") and raw["sparsity_config"].get("format") not in (None, "dense"):
            raise ValueError(f"compressed-tensors sparsity {raw['sparsity_config'].get('format')!r} "
                             "is not supported")
        return cls(tuple(sorted(f for f in formats if f)))


def quantized(parts: dict) -> bool:
    return "weight_packed" in parts or "weight_scale" in parts


def _rows(t, rows: slice | torch.Tensor) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t[:][rows]


def _scale_rows(scale, rows: slice | torch.Tensor, n: int) -> torch.Tensor:
    """Per-row scales ``[rows, groups]`` from a tensor-wise ``[1]`` / ``[]``, per-channel
    ``[N, 1]``, grouped ``[N, K / G]`` or block ``[N / B, K / B]`` scale."""
    if len(scale.shape) < 2 or scale.shape[0] == 1 and n != 1:
        s = scale[:].float().reshape(1, -1)
        return s.expand(torch.arange(n)[rows].numel(), s.shape[1])
    if scale.shape[0] == n:
        return _rows(scale, rows).float()
    block = -(-n // scale.shape[0])  # block-wise: each row reads its block row
    return scale[:].float()[torch.arange(n)[rows] // block]


def tensor(cfg: Config, prefix: str, parts: dict) -> QuantTensor:
    packed, scale = parts.get("weight_packed"), parts.get("weight_scale")
    if scale is None:
        raise ValueError(f"compressed-tensors layer {prefix} has no weight_scale")
    if packed is not None and packed.dtype == torch.int32:
        return _pack_quantized(prefix, parts)
    if packed is not None:  # FP4 bytes
        N, K = packed.shape[0], packed.shape[1] * 2
        if "weight_global_scale" in parts:
            glob = parts["weight_global_scale"][:]
            return QuantTensor((N, K), lambda r: fp4.nvfp4(_rows(packed, r), _rows(scale, r), divide=glob,
                                                           fmt="nvfp4 (compressed-tensors)"), "nvfp4")
        return QuantTensor((N, K), lambda r: fp4.mxfp4(_rows(packed, r), _rows(scale, r),
                                                       fmt="mxfp4 (compressed-tensors)"), "mxfp4")
    weight = parts["weight"]
    N, K = weight.shape
    if weight.dtype == torch.float8_e4m3fn:
        def fp8(rows):
            s = _scale_rows(scale, rows, N)
            return GroupQuant(_rows(weight, rows).view(torch.uint8), s, None, "e4m3",
                              fmt=f"fp8 e4m3 ({_strategy(s, K)})")
        return QuantTensor((N, K), fp8, "fp8")
    if weight.dtype == torch.int8:
        zp = parts.get("weight_zero_point")

        def int8(rows):
            s = _scale_rows(scale, rows, N)
            off = None if zp is None else -_scale_rows(zp, rows, N) * s
            return GroupQuant(_rows(weight, rows), s, off, "s8", fmt=f"int8 ({_strategy(s, K)})")
        return QuantTensor((N, K), int8, "int8")
    raise ValueError(f"compressed-tensors layer {prefix}: weight of dtype {weight.dtype} with a "
                     "weight_scale is not a supported scheme")


def _strategy(s: torch.Tensor, K: int) -> str:
    return "per channel" if s.shape[1] == 1 else f"g{K // s.shape[1]}"


def _pack_quantized(prefix: str, parts: dict) -> QuantTensor:
    packed, scale = parts["weight_packed"], parts["weight_scale"]
    if "weight_shape" not in parts:
        raise ValueError(f"compressed-tensors layer {prefix} lacks weight_shape")
    N, K = (int(v) for v in parts["weight_shape"][:].tolist())
    bits = packed.shape[1] * 32 // K
    if bits not in (4, 8) or packed.shape[1] * 32 != K * bits:
        raise ValueError(f"compressed-tensors layer {prefix}: {packed.shape[1]} words per row of "
                         f"{K} inputs is not 4- or 8-bit packing")
    groups = scale.shape[1] if len(scale.shape) == 2 else 1
    G = K // groups
    zp = parts.get("weight_zero_point")
    zeros = None
    if zp is not None:  # packed along the output dim, stored + 2^(bits-1)
        zeros = unpack_int32(zp[:], bits, dim=0)[:N].float() - 2 ** (bits - 1)  # [N, groups]
    perm = None
    if "weight_g_idx" in parts:
        g_idx = parts["weight_g_idx"][:].long()
        if not torch.equal(g_idx, torch.arange(K) // G):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], torch.arange(K) // G):
                raise ValueError(f"compressed-tensors layer {prefix}: weight_g_idx does not give "
                                 f"every group {G} inputs")
    fmt = f"int{bits} g{G}" + (" act-order" if perm is not None else "") + " (compressed-tensors)"

    def decode(rows: slice | torch.Tensor) -> GroupQuant:
        q = unpack_int32(_rows(packed, rows), bits, dim=1)[:, :K]  # stored + 2^(bits-1)
        s = _scale_rows(scale, rows, N) if groups == 1 else _rows(scale, rows).float()
        z = None if zeros is None else zeros[rows]
        if perm is not None:
            q = q[:, perm]
        if bits == 8:  # unsigned bytes as the signed codes they stand for
            return GroupQuant((q.to(torch.int16) - 128).to(torch.int8), s, None if z is None else -s * z,
                              "s8", fmt=fmt, perm=perm)
        if z is None:  # symmetric: code c stands for c - 8, through a table
            return GroupQuant(q, s, None, "u4", torch.tensor(INT4_SIGNED, dtype=torch.int8), fmt, perm)
        return GroupQuant(q, s, -s * (8 + z), "u4", fmt=fmt, perm=perm)

    return QuantTensor((N, K), decode, fmt)
