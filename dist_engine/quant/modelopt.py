"""NVIDIA ModelOpt checkpoints (``quant_method: "modelopt"``): NVFP4 and FP8 weights.

- NVFP4: ``weight`` uint8 ``[N, K / 2]`` (two E2M1 codes a byte), ``weight_scale`` E4M3
  ``[N, K / 16]``, ``weight_scale_2`` fp32 (per tensor): ``W = e2m1 * weight_scale *
  weight_scale_2``.
- FP8: ``weight`` E4M3 ``[N, K]``, ``weight_scale`` fp32 (per tensor).

``input_scale`` (static activation scales) is read and ignored: activations stay in the model
dtype. Layers in ``exclude_modules`` are dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_engine.quant import fp4
from dist_engine.quant.fp8 import e4m3_rows
from dist_engine.quant.lazy import QuantTensor

PARTS = ("weight", "weight_scale", "weight_scale_2", "input_scale")
ALGOS = ("NVFP4", "FP8")


@dataclass(frozen=True)
class Config:
    algo: str
    method: str = "modelopt"

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        algo = raw.get("quant_algo") or (raw.get("quantization") or {}).get("quant_algo")
        if algo not in ALGOS:
            raise ValueError(f"ModelOpt quant_algo {algo!r} is not supported (supported: {', '.join(ALGOS)})")
        return cls(algo)


def quantized(parts: dict) -> bool:
    return "weight_scale" in parts


def tensor(cfg: Config, prefix: str, parts: dict) -> QuantTensor:
    weight, scale = parts["weight"], parts["weight_scale"]
    if weight.dtype == torch.float8_e4m3fn:
        fmt = "fp8 e4m3 (modelopt)"
        return QuantTensor(tuple(weight.shape), lambda rows: e4m3_rows(weight, scale, rows, fmt), fmt)
    if "weight_scale_2" not in parts:
        raise ValueError(f"ModelOpt NVFP4 layer {prefix} lacks weight_scale_2")
    glob = parts["weight_scale_2"][:]
    N, K = weight.shape[0], weight.shape[1] * 2

    def decode(rows):
        w = weight[rows] if isinstance(rows, slice) else weight[:][rows]
        s = scale[rows] if isinstance(rows, slice) else scale[:][rows]
        return fp4.nvfp4(w, s, multiply=glob, fmt="nvfp4 (modelopt)")

    return QuantTensor((N, K), decode, "nvfp4 (modelopt)")
