"""Quantized routed experts in the cache: slots that hold the layer's own packed form.

Resident quantized weights are packed once after loading (``quant/linear.finalize`` stacks the
``GroupQuant`` parts a layer took, ``quantize_dense`` quantizes a float layer for
``--quantization``). A paged expert goes through the same steps on every load, into a staging
expert, and its packed weights (``QWeight``: codes, scales, offsets, act-order permutation) are
then copied into the slot's buffers, which are allocated once at start-up: the cache never
allocates afterwards, and a slot computes with the same kernel and the same values as a
resident expert (bitwise the same output).

The slots' form is learnt from the first expert of the index: which layers are quantized, in
which code kind, group, offsets and table. A checkpoint's scales and offsets are kept in fp32
in the slots: the packer stores them in fp16 when every value of *that* weight is exact in
fp16, which depends on the values; fp16 widens to fp32 exactly and the kernels compute in fp32,
so the products do not change. Weights quantized at load (``--quantization``) always round
their scales and offsets to fp16, so their slots keep fp16 (a fifth fewer bytes for int4). An expert whose form differs (another group size, no offsets) is a
``ValueError`` naming it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from dist_engine.experts.source import ExpertIndex, FileReader
from dist_engine.kernels import qlinear
from dist_engine.kernels.qlinear import QWeight
from dist_engine.quant.checkpoint import (
    checkpoint_quantization,
    fp4_experts,
    logical_name,
    logical_view,
)
from dist_engine.quant.groups import GroupQuant, fitting_group, quantize
from dist_engine.quant.linear import ON_LOAD, build_int4pack

if TYPE_CHECKING:
    from dist_engine.experts.slots import LoadPlan

CACHED = ("struct", "_int4pack", "_fp8_dense")  # what a QWeight caches about its tensors


class ExpertFormat:
    """How one expert's checkpoint tensors (suffix -> tensor) become packed weights.

    ``quantization``: ``--quantization int8|int4`` (float experts quantized per load);
    ``int8_activations``: the products of the slots' quantized weights take int8 activations
    where the resident ones would."""

    def __init__(self, path: str, quantization: str | None, int8_activations: bool) -> None:
        self.view = logical_view(path)  # stored parts -> one QuantTensor per quantized layer
        self.name = logical_name(path)  # stored suffix -> the suffix the module loads
        self.kept = checkpoint_quantization(path) is not None or fp4_experts(path)
        self.on_load = ON_LOAD[quantization] if quantization is not None else None
        self.int8_activations = int8_activations and qlinear.has_int8_activations()

    @property
    def quantized(self) -> bool:
        return self.kept or self.on_load is not None

    def tensors(self, raw: dict[str, torch.Tensor]) -> dict[str, object]:
        return dict(self.view(raw)) if self.kept else raw

    def packs(self, staging: nn.Module) -> dict[str, QWeight]:
        """The packed weights of a freshly loaded ``staging`` expert, by submodule path: its
        quantized parts stacked (gate and up into one weight, as ``finalize`` does), or its
        float weights quantized (``--quantization``). Layers that loaded dense and are not
        quantized on load are left out (they refill as panels)."""
        out = {}
        for path, m in staging.named_modules():
            parts = m.__dict__.pop("_quant_parts", None)
            if parts:
                order = sorted(parts)
                if sum(parts[d].shape[0] for d in order) != m.local_out:
                    raise ValueError(f"routed expert layer {path}: its quantized parts cover "
                                     f"{sum(p.shape[0] for p in parts.values())} of {m.local_out} rows")
                out[path] = GroupQuant.cat([parts[d] for d in order]).pack()
            elif self.on_load is not None and hasattr(m, "weight_packed") and m.weight.numel():
                bits, group, symmetric = self.on_load
                if fitting_group(m.weight.shape[1], group) is not None:  # else dense, as resident
                    out[path] = quantize(m.weight.detach(), bits, group, symmetric).pack()
        return out

    def learn_form(self, probe: nn.Module, staging: nn.Module, plan: LoadPlan, index: ExpertIndex,
                   read_bytes: int) -> None:
        """Shape ``probe`` (the first slot) as the first expert of ``index`` loads: read it
        once into ``staging`` through ``plan`` and pack it. The staging copy's float weights
        are then dropped where the checkpoint keeps them quantized (never read again)."""
        first = next(iter(index.refs))
        with torch.device("cpu"):  # decoding makes host tensors, as on the loading thread
            reader = FileReader(read_bytes, pin=False)
            try:
                plan.load(staging, self.tensors(reader.read(index.refs[first])))
            finally:
                reader.close()
            quantized = self.packs(staging)
        self.shape_slot(probe, quantized)
        if self.on_load is None:
            for path in quantized:
                m = staging.get_submodule(path)
                m.weight = nn.Parameter(m.weight.new_empty(0), requires_grad=False)

    def shape_slot(self, probe: nn.Module, packs: dict[str, QWeight]) -> None:
        """Give ``probe`` (a new expert) the slot form of ``packs``: each quantized layer holds
        its ``QWeight`` (fp32 scales, int8 activations as the resident layers) and an empty
        dense weight."""
        for path, qw in packs.items():
            m = probe.get_submodule(path)
            if self.on_load is None:  # a checkpoint's scales: fp16-exact or not, expert by expert
                qw = dataclasses.replace(qw, scales=qw.scales.float(),
                                         offsets=None if qw.offsets is None else qw.offsets.float())
            if self.int8_activations and qlinear.int8_activations_apply(qw):
                qw = dataclasses.replace(qw, int8_activations=True)
            m.weight_packed = qw.to(m.weight.device)
            m.weight = nn.Parameter(m.weight.new_empty(0), requires_grad=False)


def slot_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a slot whose quantized weights cache nothing about the original's
    tensors (the C view holds raw pointers)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        qw = getattr(m, "weight_packed", None)
        if isinstance(qw, QWeight):
            for key in CACHED:
                qw.__dict__.pop(key, None)
    return out


def zero_quantized(module: nn.Module) -> None:
    """Touch every byte of a slot's quantized buffers (the table stays: it is the format's)."""
    for m in module.modules():
        qw = getattr(m, "weight_packed", None)
        if isinstance(qw, QWeight):
            for t in (qw.codes, qw.scales, qw.offsets, qw.in_perm):
                if t is not None:
                    t.zero_()


def refill_packed(slot: nn.Module, packs: dict[str, QWeight], where: str) -> None:
    """Copy ``packs`` into the slot's ``QWeight`` buffers in place (same form, checked)."""
    for path, src in packs.items():
        dst = getattr(slot.get_submodule(path), "weight_packed", None)
        if not isinstance(dst, QWeight) or not _same_form(dst, src):
            have = dst.fmt if isinstance(dst, QWeight) else "dense"
            raise ValueError(f"routed expert {where}: {path} is {src.fmt} (group {src.group}, "
                             f"offsets {src.offsets is not None}, act order {src.in_perm is not None}) but "
                             f"the cache's slots were shaped by the first expert as {have}; the expert "
                             "cache needs every routed expert of a model in one quantized form")
        if dst.scales.dtype == torch.float16 and src.scales.dtype != torch.float16:
            raise ValueError(f"routed expert {where}: {path}'s scales are not exact in fp16, the "
                             "slots' scale type for weights quantized at load")
        for d, s in ((dst.codes, src.codes), (dst.scales, src.scales), (dst.offsets, src.offsets),
                     (dst.in_perm, src.in_perm)):
            if d is not None:
                d.copy_(s)
        if dst.device.type == "cuda":  # tinygemm's layout of the new codes
            dst.__dict__.pop("_int4pack", None)
            dst.__dict__.pop("_fp8_dense", None)
            build_int4pack(dst)
    for path, m in slot.named_modules():
        if isinstance(getattr(m, "weight_packed", None), QWeight) and path not in packs:
            raise ValueError(f"routed expert {where}: {path} arrived dense, but the cache's slots hold it "
                             "quantized (the first expert's form)")


def _same_form(a: QWeight, b: QWeight) -> bool:
    return ((a.codes.shape, a.scales.shape, a.kind, a.group) == (b.codes.shape, b.scales.shape, b.kind, b.group)
            and (a.offsets is None) == (b.offsets is None) and (a.in_perm is None) == (b.in_perm is None)
            and (a.lut is None) == (b.lut is None)
            and (a.lut is None or torch.equal(a.lut.cpu(), b.lut.cpu())))
