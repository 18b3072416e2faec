"""Filling an expert module from its checkpoint tensors, and reusing a cache slot's memory.

A slot is an expert module built by the layer's own constructor (same format, same products as
a resident expert). ``LoadPlan`` maps each checkpoint suffix to the module's ``load`` (the
model's packed names applied: ``gate_proj`` -> ``gate_up_proj`` shard 0), exactly as the loader
does for resident weights, and knows which suffixes a complete expert needs. On CPU, products
read weights repacked into panels; a slot keeps its panels and takes a new expert through a
dense staging copy (``refill``), so the cache never allocates after start-up.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
from torch import nn

from dist_engine.experts.formats import zero_quantized
from dist_engine.kernels import linear as cpu_linear
from dist_engine.kernels.qlinear import QWeight
from dist_engine.layers.linear import pack_weight

Key = tuple[str, int]  # (checkpoint prefix of the layer's experts, expert id)


class Slot:
    """One expert's place in the cache: the module it computes with, what it holds, and its
    state (loading while ``future`` is pending, pinned while a layer computes with it)."""

    def __init__(self, module: nn.Module, cuda: bool) -> None:
        self.module = module
        self.key: Key | None = None
        self.future: Future | None = None
        self.seq = 0  # submission order (the loader is FIFO)
        self.pins = 0
        self.prefetched = False  # loaded ahead and not yet claimed by its layer
        self.released = torch.cuda.Event() if cuda else None  # last compute read of the slot

    @property
    def ready(self) -> bool:
        return self.future is None or self.future.done()


def fmt(n: float) -> str:
    """Bytes for a person."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


class LoadPlan:
    """``targets[suffix] = (submodule, parameter name, shard id)`` for one expert module."""

    def __init__(self, module: nn.Module, packed: dict[str, tuple[str, object]]) -> None:
        by_ours: dict[str, dict[object, str]] = {}
        for ckpt, (ours, sid) in packed.items():
            by_ours.setdefault(ours, {})[sid] = ckpt
        self.targets: dict[str, tuple[str, str, object]] = {}
        for pname, _ in module.named_parameters():
            path, _, which = pname.rpartition(".")
            sub = module.get_submodule(path)
            parent, _, leaf = path.rpartition(".")
            shards = getattr(sub, "shards", {None: None})
            for sid in shards:
                if leaf in by_ours and sid in by_ours[leaf]:  # a checkpoint name of its own (V4's w2)
                    name = f"{parent}.{by_ours[leaf][sid]}" if parent else by_ours[leaf][sid]
                elif sid is None:
                    name = path
                else:
                    raise ValueError(f"expert parameter {pname} shard {sid!r} has no checkpoint name")
                self.targets[f"{name}.{which}"] = (path, which, sid)

    @property
    def suffixes(self) -> set[str]:
        return set(self.targets)

    def load(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for suffix, tensor in tensors.items():
            path, which, sid = self.targets[suffix]
            try:
                module.get_submodule(path).load(which, tensor, sid)
            except ValueError as e:
                raise ValueError(f"routed expert tensor {suffix!r} {tuple(tensor.shape)}: {e}") from None


def packs(module: nn.Module) -> bool:
    """Whether ``module``'s products read packed weights (CPU), so a slot needs a staging copy."""
    return any(getattr(m, "weight_packed", None) is not None for m in module.modules())


def zero_fill(module: nn.Module) -> None:
    """Touch every byte of a new slot, so its memory is resident (and counted) from start-up."""
    for p in module.parameters():
        p.data.zero_()
    zero_quantized(module)


def refill(slot: nn.Module, staging: nn.Module) -> None:
    """Copy a dense, freshly loaded ``staging`` expert into ``slot`` (same constructor), packing
    its weights into the slot's existing panels."""
    for dst, src in zip(slot.modules(), staging.modules()):
        packed = getattr(dst, "weight_packed", None)
        if isinstance(packed, QWeight):  # refilled in place from the staging expert's packs
            continue
        if isinstance(packed, cpu_linear.PanelWeight):
            cpu_linear.pack_into(packed, src.weight)
        elif packed is not None:  # another packed layout (oneDNN, no C compiler): pack anew
            dst.weight = nn.Parameter(src.weight.detach().clone(), requires_grad=False)
            dst.weight_packed = None
            pack_weight(dst)
    for d, s in zip(slot.parameters(), staging.parameters()):
        if d.numel():  # a packed weight's dense parameter is empty
            d.data.copy_(s.data)
