"""AWQ checkpoints (AutoAWQ's GEMM layout, ``quant_method: "awq"``), 4-bit.

Per layer: ``qweight`` int32 ``[K, N / 8]`` and ``qzeros`` int32 ``[K / G, N / 8]``, eight codes
per word along the output dim in AWQ's interleaved order (nibble i holds output
``8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]``), ``scales`` fp16 ``[K / G, N]``;
``W[n, k] = scales[g, n] * (q[k, n] - zero[g, n])``, ``g = k // G``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_engine.quant.groups import GroupQuant
from dist_engine.quant.lazy import QuantTensor
from dist_engine.quant.packing import unpack_int32

PARTS = ("qweight", "qzeros", "scales")
# unpacked position j of a word (output 8c + j) reads nibble UNPACK[j]
UNPACK = (0, 4, 1, 5, 2, 6, 3, 7)


@dataclass(frozen=True)
class Config:
    group_size: int
    zero_point: bool
    method: str = "awq"

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        bits = raw.get("bits", raw.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"AWQ with {bits} bits is not supported (4)")
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (gemm)")
        return cls(int(raw.get("group_size", raw.get("q_group_size", 128))), bool(raw.get("zero_point", True)))


def quantized(parts: dict) -> bool:
    return "qweight" in parts


def tensor(cfg: Config, prefix: str, parts: dict) -> QuantTensor:
    missing = [p for p in PARTS if p not in parts]
    if missing:
        raise ValueError(f"AWQ layer {prefix} lacks {', '.join(missing)}")
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    K, N = qweight.shape[0], qweight.shape[1] * 8
    G = K if cfg.group_size == -1 else cfg.group_size
    if scales.shape != (K // G, N):
        raise ValueError(f"AWQ layer {prefix}: scales {scales.shape}, expected {(K // G, N)}")
    fmt = f"awq int4 g{G}"

    def words(t, rows: slice | torch.Tensor) -> tuple[torch.Tensor, slice | torch.Tensor]:
        """The packed columns holding output ``rows`` and where those rows sit in them."""
        if isinstance(rows, slice):
            c0, c1 = rows.start // 8, -(-rows.stop // 8)
            return t[:, c0:c1], slice(rows.start - 8 * c0, rows.stop - 8 * c0)
        return t[:], rows

    def decode(rows: slice | torch.Tensor) -> GroupQuant:
        w, at = words(qweight, rows)
        q = unpack_int32(w, 4, dim=1, order=UNPACK)[:, at].T  # [n, K]
        s = (scales[:, rows] if isinstance(rows, slice) else scales[:][:, rows]).float().T
        if not cfg.zero_point:
            return GroupQuant(q, s, -8 * s, "u4", fmt=fmt)
        zw, zat = words(qzeros, rows)
        z = unpack_int32(zw, 4, dim=1, order=UNPACK)[:, zat].T.float()
        return GroupQuant(q, s, -z * s, "u4", fmt=fmt)

    return QuantTensor((N, K), decode, fmt)
