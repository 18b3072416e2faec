"""FP8 (E4M3) weights with per-tensor, per-channel or block scales (``quant_method: "fp8"``,
as vLLM and transformers' FineGrainedFP8 write them), for every architecture but DeepSeek-V3,
whose block-scaled layers keep their own path (``layers/fp8.py``).

Per layer: ``weight`` float8_e4m3fn ``[N, K]`` and ``weight_scale`` (a scalar, or ``[N]`` /
``[N, 1]``) or ``weight_scale_inv`` (``[N / B, K / B]`` tiles); ``W = weight * scale``. The
kernels keep the FP8 bytes (one byte a weight) with one scale per row and group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_engine.quant.groups import GroupQuant
from dist_engine.quant.lazy import QuantTensor

PARTS = ("weight", "weight_scale", "weight_scale_inv", "input_scale")


@dataclass(frozen=True)
class Config:
    block: tuple[int, int] | None
    method: str = "fp8"

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        block = raw.get("weight_block_size")
        return cls(tuple(block) if block else None)


def quantized(parts: dict) -> bool:
    return "weight" in parts and parts["weight"].dtype == torch.float8_e4m3fn


def e4m3_rows(weight, scale, rows: slice | torch.Tensor, fmt: str, tiles: bool = False,
              block: tuple[int, int] | None = None) -> GroupQuant:
    """Rows of an FP8 weight with a scalar, per-row ``[N]`` / ``[N, 1]`` or (``tiles``) tile-grid
    ``[ceil(N / Br), ceil(K / Bc)]`` scale, ``block`` = (Br, Bc) as the config declares it (a
    grid one tile wide is ``[N / Br, 1]``, and a partial last tile hides the tile size: only the
    config, not the shape, tells them apart)."""
    N, K = weight.shape
    w = weight[rows] if isinstance(rows, slice) else weight[:][rows]
    n = w.shape[0]
    s = scale[:].float()
    if s.numel() == 1 and not tiles:
        s = s.reshape(1, 1).expand(n, 1)
    elif not tiles:
        if s.numel() != N:
            raise ValueError(f"{fmt}: a per-row scale of shape {tuple(s.shape)} for {N} rows")
        s = s.reshape(N, 1)[rows]
    else:  # tiles: each row reads its tile row; columns stay groups of the tile width
        s = s.reshape(s.shape[0] if s.dim() else 1, -1)
        br, bc = block or (-(-N // s.shape[0]), -(-K // s.shape[1]))
        if s.shape != (-(-N // br), -(-K // bc)) or (block is None and (N % br or K % bc)):
            raise ValueError(f"{fmt}: a scale grid of shape {tuple(s.shape)} does not tile a {N} x {K} "
                             f"weight in {'blocks of ' + str(block) if block else 'whole tiles'}")
        if K % bc:
            raise ValueError(f"{fmt}: {K} inputs are not whole tiles of {bc}")
        s = s[torch.arange(N)[rows] // br]
    return GroupQuant(w.view(torch.uint8), s.contiguous(), None, "e4m3", fmt=fmt)


def tensor(cfg: Config, prefix: str, parts: dict) -> QuantTensor:
    scale = parts.get("weight_scale_inv", parts.get("weight_scale"))
    if scale is None:
        raise ValueError(f"FP8 layer {prefix} has no weight_scale / weight_scale_inv")
    weight = parts["weight"]
    # weight_scale_inv (and any scale of a checkpoint declaring weight_block_size) is a tile grid
    tiles = "weight_scale_inv" in parts or cfg.block is not None
    kind = "block" if tiles else ("per channel" if scale.shape and scale.shape[0] > 1 else "per tensor")
    fmt = f"fp8 e4m3 ({kind})"
    return QuantTensor(tuple(weight.shape), lambda rows: e4m3_rows(weight, scale, rows, fmt, tiles, cfg.block), fmt)
