"""GPTQ checkpoints (AutoGPTQ / GPTQModel, ``quant_method: "gptq"``), 4- or 8-bit.

Per layer: ``qweight`` int32 ``[K * bits / 32, N]`` (codes packed along the input dim, code i
of a word at bits ``bits * i``), ``qzeros`` int32 ``[K / G, N * bits / 32]`` (packed along
the output dim), ``scales`` fp16 ``[K / G, N]``, ``g_idx`` int32 ``[K]`` (each input's group).
``W[n, k] = scales[g, n] * (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``; the original
``gptq`` format stores each zero minus one (``gptq_v2`` stores it as is).

With activation order (``desc_act``), ``g_idx`` is not ``k // G``: the engine sorts the inputs
by group (every group keeps its G inputs), and the product reads x in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_engine.quant.groups import GroupQuant
from dist_engine.quant.lazy import QuantTensor
from dist_engine.quant.packing import unpack_int32

PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Config:
    bits: int
    group_size: int  # -1: one group per row
    desc_act: bool
    zero_offset: int  # 1 for the original format's stored zeros, 0 for gptq_v2
    method: str = "gptq"

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        bits = raw.get("bits", raw.get("w_bit"))
        if bits not in (4, 8):
            raise ValueError(f"GPTQ with {bits} bits is not supported (4 or 8)")
        fmt = raw.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        return cls(bits, int(raw.get("group_size", 128)), bool(raw.get("desc_act", False)),
                   1 if fmt == "gptq" else 0)


def quantized(parts: dict) -> bool:
    return "qweight" in parts


def tensor(cfg: Config, prefix: str, parts: dict) -> QuantTensor:
    missing = [p for p in ("qweight", "qzeros", "scales") if p not in parts]
    if missing:
        raise ValueError(f"GPTQ layer {prefix} lacks {', '.join(missing)}")
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    K, N = qweight.shape[0] * 32 // cfg.bits, qweight.shape[1]
    G = K if cfg.group_size == -1 else cfg.group_size
    if scales.shape != (K // G, N):
        raise ValueError(f"GPTQ layer {prefix}: scales {scales.shape}, expected {(K // G, N)} "
                         f"for groups of {G}")
    g_idx = parts["g_idx"][:].long() if "g_idx" in parts else None
    perm = None
    if g_idx is not None and not torch.equal(g_idx, torch.arange(K) // G):
        perm = torch.argsort(g_idx, stable=True)  # inputs sorted by group
        if not torch.equal(g_idx[perm], torch.arange(K) // G):
            raise ValueError(f"GPTQ layer {prefix}: g_idx does not give every group {G} inputs")
    zeros = unpack_int32(qzeros[:], cfg.bits, dim=1)[:, :N].T.float()  # [N, K / G]
    fmt = f"gptq int{cfg.bits} g{G}" + (" act-order" if perm is not None else "")

    def decode(rows: slice | torch.Tensor) -> GroupQuant:
        cols = rows if isinstance(rows, slice) else rows
        q = unpack_int32(qweight[:, cols] if isinstance(rows, slice) else qweight[:][:, rows],
                         cfg.bits, dim=0).T  # [n, K] uint8
        s = (scales[:, cols] if isinstance(rows, slice) else scales[:][:, rows]).float().T
        z = zeros[rows] + cfg.zero_offset
        if perm is not None:
            q = q[:, perm]
        if cfg.bits == 8:  # bytes 0..255 as signed codes - 128, the offset shifted to match
            return GroupQuant((q.to(torch.int16) - 128).to(torch.int8), s, -(z - 128) * s, "s8",
                              fmt=fmt, perm=perm)
        return GroupQuant(q, s, -z * s, "u4", fmt=fmt, perm=perm)

    return QuantTensor((N, K), decode, fmt)
