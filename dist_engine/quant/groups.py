"""Group-quantized weights in plain ``[out, in]`` order: what every format decodes into.

A ``GroupQuant`` is ``W[n, k] = scale[n, k // G] * value(code[n, k]) + offset[n, k // G]``
with one code per element (held in a byte while loading; the kernel layout packs 4-bit codes two
per byte). Each checkpoint format (GGUF blocks, GPTQ, AWQ, compressed-tensors, FP8, FP4) only
has to say how its tensors map onto codes, scales and offsets; slicing for tensor parallelism,
stacking q/k/v, packing for the kernels and dequantizing are done here once.

Code kinds: ``u4`` (0..15, or through a 16-entry table of signed values: E2M1 for FP4,
-8..7 for symmetric int4), ``s8`` (signed bytes; also 5- and 6-bit codes), ``e4m3`` (FP8).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dist_engine.kernels import qlinear

CODE_KINDS = ("u4", "s8", "e4m3")
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # FP4 values x 2
INT4_SIGNED = tuple(range(-8, 8))  # a u4 code c stands for c - 8


class ShardError(ValueError):
    """A tensor-parallel slice that would cut a quantization group."""


@dataclass(frozen=True)
class GroupQuant:
    """codes ``[N, K]`` (uint8 for u4 / e4m3, int8 for s8), scales / offsets ``[N, K / G]``
    fp32 (offsets may be None), ``lut``: int8 ``[16]`` u4 table or None, ``fmt``: a name for
    logs (``"gguf Q4_1"``, ``"gptq int4 g128"``). ``perm`` ``[K]``: code column j holds input
    ``perm[j]`` (GPTQ's activation order, columns sorted by group so groups are contiguous);
    None for the identity."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    kind: str
    lut: torch.Tensor | None = None
    fmt: str = ""
    perm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        N, K = self.codes.shape
        if self.kind not in CODE_KINDS:
            raise ValueError(f"unknown code kind {self.kind!r}")
        if self.scales.dim() != 2 or self.scales.shape[0] != N or K % self.scales.shape[1]:
            raise ValueError(f"{self.fmt}: scales {tuple(self.scales.shape)} do not tile codes {(N, K)}")
        if self.offsets is not None and self.offsets.shape != self.scales.shape:
            raise ValueError(f"{self.fmt}: offsets {tuple(self.offsets.shape)} differ from scales")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    # ---- slicing --------------------------------------------------------------------------
    def rows(self, index: slice | torch.Tensor) -> GroupQuant:
        off = None if self.offsets is None else self.offsets[index]
        return replace(self, codes=self.codes[index], scales=self.scales[index], offsets=off)

    def cols(self, start: int, stop: int) -> GroupQuant:
        """Inputs ``[start, stop)``: whole groups, or a part of one group (per-channel
        scales split over ranks); anything else cuts a group and is a ``ShardError``."""
        G, K = self.group, self.codes.shape[1]
        if (start, stop) == (0, K):
            return self
        if self.perm is not None:
            return self._permuted_cols(start, stop)
        if start % G == 0 and stop % G == 0:
            g0, g1 = start // G, stop // G
        elif start // G == (stop - 1) // G:  # inside one group: it becomes the slice's group
            g0, g1 = start // G, start // G + 1
        else:
            raise ShardError(
                f"{self.fmt or 'quantized weight'}: a tensor-parallel shard of inputs "
                f"[{start}, {stop}) cuts its groups of {G}; choose a TP size whose shards hold "
                f"whole groups (shard boundaries at multiples of {G})")
        off = None if self.offsets is None else self.offsets[:, g0:g1]
        return replace(self, codes=self.codes[:, start:stop], scales=self.scales[:, g0:g1], offsets=off)

    def _permuted_cols(self, start: int, stop: int) -> GroupQuant:
        """Inputs ``[start, stop)`` of an activation-ordered weight: the code columns holding
        them must make up whole groups."""
        G = self.group
        keep = ((self.perm >= start) & (self.perm < stop)).nonzero().squeeze(1)  # ascending
        groups = keep // G
        counts = torch.bincount(groups, minlength=self.scales.shape[1])
        if bool(((counts != 0) & (counts != G)).any()):
            raise ShardError(
                f"{self.fmt or 'quantized weight'}: with activation order, the inputs "
                f"[{start}, {stop}) of a tensor-parallel shard hold parts of groups of {G}; this "
                "checkpoint can run at a TP size whose shards hold whole groups only (or TP=1)")
        g = counts.nonzero().squeeze(1)
        off = None if self.offsets is None else self.offsets[:, g]
        return replace(self, codes=self.codes[:, keep], scales=self.scales[:, g], offsets=off,
                       perm=self.perm[keep] - start)

    # ---- stacking parts of one weight (q/k/v, gate/up) ------------------------------------
    def promote(self, kind: str, group: int, offsets: bool) -> GroupQuant:
        """The same values with codes of ``kind``, groups of ``group`` (dividing this one's)
        and offsets if asked: what lets parts of different formats share one weight."""
        out = self
        if kind != self.kind:
            if kind != "s8" or self.kind != "u4":
                raise ValueError(f"cannot hold {self.fmt} codes ({self.kind}) as {kind}")
            codes = self.lut[self.codes.long()] if self.lut is not None else self.codes.to(torch.int8)
            out = replace(out, codes=codes.to(torch.int8), kind="s8", lut=None)
        if group != self.group:
            if self.group % group:
                raise ValueError(f"groups of {self.group} cannot be split into groups of {group}")
            rep = self.group // group
            out = replace(out, scales=out.scales.repeat_interleave(rep, dim=1),
                          offsets=None if out.offsets is None else out.offsets.repeat_interleave(rep, dim=1))
        if offsets and out.offsets is None:
            out = replace(out, offsets=torch.zeros_like(out.scales))
        return out

    @staticmethod
    def cat(parts: list[GroupQuant]) -> GroupQuant:
        """Parts stacked along the output rows, promoted to one common format (an input order
        must be the same in every part: GPTQ orders q/k/v, gate/up by their shared input)."""
        if len(parts) == 1:
            return parts[0]
        perms = [p.perm for p in parts]
        if any(p is not None for p in perms) and not all(
                p is not None and torch.equal(p, perms[0]) for p in perms):
            raise ValueError("parts of one weight were quantized in different input orders "
                             "(activation order, g_idx); they cannot share one product")
        kinds = {p.kind for p in parts}
        luts = {None if p.lut is None else tuple(p.lut.tolist()) for p in parts}
        if "e4m3" in kinds and len(kinds) > 1:
            raise ValueError("cannot stack FP8 and integer parts into one weight")
        kind = kinds.pop() if len(kinds) == 1 and len(luts) == 1 else "s8"
        group = min(p.group for p in parts)
        with_offsets = any(p.offsets is not None for p in parts)
        parts = [p.promote(kind, group, with_offsets) for p in parts]
        fmts = sorted({p.fmt for p in parts})
        return GroupQuant(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                          None if not with_offsets else torch.cat([p.offsets for p in parts]),
                          kind, parts[0].lut, " + ".join(fmts), perms[0])

    # ---- values ---------------------------------------------------------------------------
    def values(self) -> torch.Tensor:
        """The codes' values ``[N, K]`` as fp32 (table applied)."""
        if self.kind == "e4m3":
            return self.codes.view(torch.float8_e4m3fn).float()
        if self.lut is not None:
            return self.lut[self.codes.long()].float()
        return self.codes.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N, K]`` in the inputs' own order."""
        N, K = self.shape
        G = self.group
        w = self.values().view(N, K // G, G) * self.scales.unsqueeze(-1)
        if self.offsets is not None:
            w = w + self.offsets.unsqueeze(-1)
        w = w.view(N, K)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    def pack(self) -> qlinear.QWeight:
        """The kernel's layout (``kernels/qlinear.py``)."""
        codes = self.codes.view(torch.uint8) if self.kind == "e4m3" else self.codes
        return qlinear.pack(codes, self.scales, self.offsets, self.kind, self.lut, fmt=self.fmt,
                            in_perm=self.perm)


def fitting_group(in_features: int, group: int) -> int | None:
    """The largest group of at most ``group`` inputs, a multiple of 8, tiling ``in_features``
    (a TP shard of 48 inputs takes groups of 24); None when there is none."""
    return next((g for g in range(group, 7, -8) if in_features % g == 0), None)


def quantize(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> GroupQuant:
    """Round-to-nearest group quantization of a float weight ``[N, K]`` (``--quantization``),
    with scales rounded to fp16 (two bytes each in the kernel layout), as GGUF does:
    int8 symmetric (Q8_0: codes -127..127, scale max|w| / 127); int4 symmetric (Q4_0: the
    largest-magnitude weight maps to code -8, codes -8..7 held as u4 through a table) or
    asymmetric (Q4_1: codes 0..15 between the group's min and max, the min as offset)."""
    N, K = w.shape
    group = fitting_group(K, group)
    if group is None:
        raise ValueError(f"cannot quantize rows of {K} inputs: the kernels need a multiple of 8")
    x = w.detach().float().view(N, K // group, group)

    def inverse(scale: torch.Tensor) -> torch.Tensor:
        return torch.where(scale != 0, 1 / scale, torch.zeros_like(scale)).unsqueeze(-1)

    if bits == 8:
        scale = (x.abs().amax(-1) / 127).half().float()
        codes = torch.round(x * inverse(scale)).clamp(-127, 127).to(torch.int8)
        return GroupQuant(codes.view(N, K), scale, None, "s8", fmt=f"int8 g{group}")
    if bits != 4:
        raise ValueError(f"only 4- and 8-bit weights can be quantized at load, not {bits}")
    if symmetric:
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed
        scale = (peak / -8).half().float()
        codes = (torch.round(x * inverse(scale)).clamp(-8, 7) + 8).to(torch.uint8)
        lut = torch.tensor(INT4_SIGNED, dtype=torch.int8)
        return GroupQuant(codes.view(N, K), scale, None, "u4", lut, fmt=f"int4 sym g{group}")
    lo, hi = x.amin(-1), x.amax(-1)
    low, scale = lo.half().float(), ((hi - lo) / 15).half().float()
    codes = torch.round((x - low.unsqueeze(-1)) * inverse(scale)).clamp(0, 15).to(torch.uint8)
    return GroupQuant(codes.view(N, K), scale, low, "u4", fmt=f"int4 g{group}")
