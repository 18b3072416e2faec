"""GGUF (llama.cpp) tensors read kept quantized: each GGML block type decoded into codes,
scales and offsets (``GroupQuant``) that give exactly the values llama.cpp's dequantization
gives (every product of a scale and a code is exact in fp32, so one rounding remains, as
there).

| GGML type | codes | group | scale / offset |
|---|---|---|---|
| Q8_0 | s8 | 32 | d |
| Q4_0 | u4 as -8..7 | 32 | d |
| Q4_1 | u4 | 32 | d / m |
| Q5_0, Q5_1 | s8 (5-bit) | 32 | d (codes - 16) / d, m |
| Q4_K, Q5_K | u4 / s8 (5-bit) | 32 | d * scale_j / -dmin * min_j |
| Q6_K | s8 (6-bit, - 32) | 16 | d * scale_j |
| MXFP4 | u4 as E2M1 x 2 | 32 | 2^(e - 128) |
| NVFP4 | u4 as E2M1 x 2 | 16 | UE4M3 / 2 |

F32 / F16 / BF16 tensors (norms, sometimes embeddings) stay dense. Q5 and Q6 codes take a byte
each in the kernel layout (10 bits a weight with fp32 scales, against 5.5 / 6.6 in the file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dist_engine.quant.groups import E2M1_DOUBLED, INT4_SIGNED, GroupQuant
from dist_engine.quant.lazy import QuantTensor, permuted
from dist_engine.weights.gguf_meta import GGUF_LINK, field, hf_name, rotary_order

QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] fp32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n]: the low nibbles, then the high ones (llama.cpp's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q8_0(b):
    return b[..., 2:].view(np.int8), _f16(b[..., 0:2]), None, "s8", None


def _q4_0(b):
    return _nibbles(b[..., 2:]), _f16(b[..., 0:2]), None, "u4", INT4_SIGNED


def _q4_1(b):
    return _nibbles(b[..., 4:]), _f16(b[..., 0:2]), _f16(b[..., 2:4]), "u4", None


def _q5_high(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes of high bits -> [..., 32] (bit i of the little-endian word: element i)."""
    word = np.ascontiguousarray(qh).view(np.uint32)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q5_0(b):
    q = _nibbles(b[..., 6:]) | (_q5_high(b[..., 2:6]) << 4)
    return (q.astype(np.int16) - 16).astype(np.int8), _f16(b[..., 0:2]), None, "s8", None


def _q5_1(b):
    q = _nibbles(b[..., 8:]) | (_q5_high(b[..., 4:8]) << 4)
    return q.view(np.int8), _f16(b[..., 0:2]), _f16(b[..., 2:4]), "s8", None


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (the two high bits of
    sub-blocks 4-7 sit in the top bits of bytes 0-7)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_low(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 nibbles: 32-byte chunk c holds sub-blocks 2c (low) and 2c + 1 (high)."""
    c = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.stack([c & 0x0F, c >> 4], axis=-2).reshape(*qs.shape[:-1], QK_K)


def _q4_k(b):
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scales(b[..., 4:16])
    return _k_low(b[..., 16:144]), d * sc, -(dmin * mn), "u4", None


def _q5_k(b):
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scales(b[..., 4:16])
    qh = b[..., 16:48]  # bit j of byte i: the fifth bit of sub-block j's element i
    high = ((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(*qh.shape[:-1], QK_K)
    q = _k_low(b[..., 48:176]) | (high << 4)
    return q.view(np.int8), d * sc, -(dmin * mn), "s8", None


def _q6_k(b):
    ql, qh = b[..., 0:128], b[..., 128:192]
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])[..., None]
    lead = b.shape[:-1]
    low = ql.reshape(*lead, 2, 64)  # chunk c: elements 128c + 0..63 low, + 64..127 high
    low = np.stack([low & 0x0F, low >> 4], axis=-2).reshape(*lead, QK_K)
    hi = qh.reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    hi = (hi & 3).reshape(*lead, QK_K)  # chunk c, shift s: elements 128c + 32s + 0..31
    q = (low | (hi << 4)).astype(np.int16) - 32
    return q.astype(np.int8), d * sc, None, "s8", None


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """UE8M0 exponent byte -> 2^(e - 128) as fp32 (half the block scale: codes are E2M1 x 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def _ue4m3_half(x: np.ndarray) -> np.ndarray:
    """Unsigned E4M3 byte -> its value / 2 (NaN 0x7F reads as 0, as in llama.cpp)."""
    exp, man = (x >> 3).astype(np.int32) & 0xF, (x & 7).astype(np.float32)
    v = np.where(exp == 0, man * 2.0 ** -9, (1 + man / 8) * np.exp2(exp.astype(np.float32) - 7))
    return np.where(x == 0x7F, 0.0, v * 0.5).astype(np.float32)


def _mxfp4(b):
    return _nibbles(b[..., 1:17]), _e8m0_half(b[..., 0]), None, "u4", E2M1_DOUBLED


def _nvfp4(b):
    qs = b[..., 4:36].reshape(*b.shape[:-1], 4, 8)  # sub-block s: elements 16s + 0..7 low, 8..15 high
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(*b.shape[:-1], 64)
    return codes, _ue4m3_half(b[..., 0:4]), None, "u4", E2M1_DOUBLED


# GGML type name -> (elements per block, bytes per block, decoder)
DECODERS = {
    "Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1), "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k), "Q6_K": (QK_K, 210, _q6_k), "MXFP4": (32, 17, _mxfp4),
    "NVFP4": (64, 36, _nvfp4),
}
DENSE = ("F32", "F16", "BF16")


def decode(raw: np.ndarray, type_name: str, in_features: int) -> GroupQuant:
    """Rows of a GGML tensor (``[rows, bytes per row]`` uint8) as a ``GroupQuant``."""
    block, size, fn = DECODERS[type_name]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, in_features // block, size)
    codes, scales, offsets, kind, lut = fn(blocks)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(rows, -1))  # noqa: E731
    return GroupQuant(t(codes).view(torch.int8 if kind == "s8" else torch.uint8), t(scales).float(),
                      None if offsets is None else t(offsets).float(), kind,
                      None if lut is None else torch.tensor(lut, dtype=torch.int8), f"gguf {type_name}")


def _quant_tensor(data: np.ndarray, type_name: str, out_features: int, in_features: int) -> QuantTensor:
    def rows(index):
        idx = index if isinstance(index, slice) else index.numpy()
        return decode(data[idx], type_name, in_features)
    return QuantTensor((out_features, in_features), rows, f"gguf {type_name}")


def _dense(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if type_name == "BF16":
        return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.array(data)).reshape(shape)


def iter_tensors(folder: str) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
    """(HF name, tensor) for every tensor of the folder's GGUF file: dense tensors as torch
    tensors, quantized ones as ``QuantTensor``; stacked experts one tensor per expert; Llama's
    q/k rows put back in HF's rotary order."""
    from gguf import GGUFReader

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    reader = GGUFReader(os.path.join(folder, GGUF_LINK))
    llama = field(reader, "general.architecture") == "llama"
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for t in reader.tensors:
        type_name = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        if type_name not in DENSE and type_name not in DECODERS:
            raise ValueError(f"GGUF tensor {t.name} has type {type_name}, which is not supported "
                             f"(supported: {', '.join(DENSE + tuple(DECODERS))})")
        name = hf_name(t.name)
        experts = shape[0] if len(shape) == 3 else None
        for e in range(experts or 1):
            data = t.data[e] if experts else t.data
            full = shape[1:] if experts else shape
            tensor = (_dense(data, type_name, full) if type_name in DENSE
                      else _quant_tensor(data, type_name, full[0], full[1]))
            proj = name.split(".")[-2]
            if llama and proj in heads:
                order = rotary_order(full[0], heads[proj])
                tensor = tensor[order] if isinstance(tensor, torch.Tensor) else permuted(tensor, order)
            yield (name.format(e) if experts else name), tensor


def tensor_names(folder: str) -> set[str]:
    return {name for name, _ in iter_tensors(folder)}


@dataclass(frozen=True)
class Config:
    """``quantization_config`` of a GGUF folder (``weights/gguf_meta.py`` writes it): the
    tensors come from ``model.gguf``, each in its own GGML type."""

    method: str = "gguf"

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        return cls()
