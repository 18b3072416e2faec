"""Loads a rank's weight shards straight from safetensors files.

Each checkpoint tensor is opened lazily (``safe_open(...).get_slice``) and the owning layer cuts
out only its rows/columns, so a rank never materialises other ranks' slices. Every checkpoint
tensor must be consumed or explicitly ignored, and every parameter must be filled: anything
else is a ``ValueError`` naming the tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from dist_engine.layers.fp8 import CheckpointFormatError
from dist_engine.quant import linear as quant_linear
from dist_engine.quant.checkpoint import logical_tensors
from dist_engine.weights.gguf_meta import GGUF_LINK

_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "BF16": torch.bfloat16,
           "F16": torch.float16, "F32": torch.float32, "I32": torch.int32, "I64": torch.int64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16}


class LazySlice:
    """A checkpoint tensor read on indexing; ``shape`` and ``dtype`` without reading any data."""

    def __init__(self, handle, name: str) -> None:
        self._handle, self._name = handle, name
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        self.dtype = _DTYPES.get(self._slice.get_dtype())

    def __getitem__(self, idx) -> torch.Tensor:
        if not self.shape:  # a scalar (a quantization scale): there is nothing to slice
            return self._handle.get_tensor(self._name)
        return self._slice[idx]


def is_gguf_folder(path: str) -> bool:
    """A folder serving a GGUF file kept quantized (``weights/gguf_meta.py``)."""
    return os.path.exists(os.path.join(path, GGUF_LINK))


def checkpoint_files(path: str) -> list[str]:
    if is_gguf_folder(path):
        return [os.path.join(path, GGUF_LINK)]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    return [os.path.join(path, f) for f in files]


def tensor_names(path: str) -> set[str]:
    """Every tensor name in the checkpoint at ``path`` (headers only, no data read)."""
    return {name for name, _ in iter_checkpoint(path)}


def iter_checkpoint(path: str) -> Iterator[tuple[str, object]]:
    """(name, lazy tensor) for every weight of the checkpoint: safetensors slices, or, where
    the checkpoint is quantized, one ``QuantTensor`` per quantized weight (``quant/``)."""
    if is_gguf_folder(path):
        from dist_engine.quant.gguf import iter_tensors

        yield from iter_tensors(path)
        return
    with contextlib.ExitStack() as files:  # a layer's parts may sit in different files
        tensors = {}
        for file in checkpoint_files(path):
            handle = files.enter_context(safe_open(file, framework="pt"))
            tensors.update((name, LazySlice(handle, name)) for name in handle.keys())
        yield from logical_tensors(path, tensors)


def load_weights(model: nn.Module, path: str, select: Callable[[str], bool] | None = None) -> None:
    """Fill ``model``'s parameters from the checkpoint at ``path`` (this rank's slices only).

    ``select``: which checkpoint tensors belong to ``model`` (the rest are another module's,
    e.g. MTP layers stored alongside the main model); default all.
    """
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
    ignored: tuple[str, ...] = getattr(model, "ignored_suffixes", ())
    skip = getattr(model, "skip_tensor", None)  # another rank's tensor (e.g. routed experts)
    # checkpoint name -> our name, or None for a tensor ignored by design (another model's part)
    rename = getattr(model, "checkpoint_name", None)
    expected = {name for name, _ in model.named_parameters()}
    filled: dict[str, set] = {}
    for stored, lazy in iter_checkpoint(path):
        name = rename(stored) if rename is not None else stored
        if name is None:
            continue
        if name.endswith(ignored) or (select is not None and not select(name)) or (skip and skip(name)):
            continue
        module_path, _, which = name.rpartition(".")
        shard_id = None
        for ckpt_name, (ours, sid) in packed.items():
            if module_path.endswith("." + ckpt_name):
                module_path = module_path[: -len(ckpt_name)] + ours
                shard_id = sid
                break
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise ValueError(f"checkpoint tensor {stored!r} {lazy.shape} matches no module of "
                             f"{type(model).__name__}") from None
        # a tensor that spans several of our parameters (fused experts) is split by the module
        fused = getattr(module, which, None) is None and hasattr(module, "load_fused")
        if not fused and (not hasattr(module, "load") or getattr(module, which, None) is None):
            raise ValueError(f"checkpoint tensor {stored!r} has no parameter to load into")
        try:
            parts = module.load_fused(which, lazy) if fused else [(which, shard_id)]
            if not fused:
                module.load(which, lazy, shard_id)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"checkpoint tensor {stored!r}: {e}") from None
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {stored!r} has shape {lazy.shape}, which does not "
                             f"match the model config ({e})") from None
        for param, sid in parts:
            filled.setdefault(f"{module_path}.{param}", set()).add(sid)
    missing = []
    for pname in sorted(expected):
        module_path, _, _ = pname.rpartition(".")
        module = model.get_submodule(module_path)
        want = set(module.shards) if hasattr(module, "shards") else {None}
        got = filled.get(pname, set())
        if not want <= got:
            missing.append(pname if want == {None} else f"{pname} (parts {sorted(map(str, want - got))})")
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint {path} is missing tensors for: {shown}")
    quant_linear.finalize(model)  # stack and pack the weights kept quantized
