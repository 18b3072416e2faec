"""A quantized safetensors checkpoint seen as one tensor per weight.

Formats store a quantized weight as several tensors (GPTQ: ``qweight``, ``qzeros``, ``scales``,
``g_idx``; compressed-tensors: ``weight_packed``, ``weight_scale``...). ``logical_tensors``
gathers them per layer and yields ``<layer>.weight`` as one ``QuantTensor`` (what the layers
load), and every other tensor unchanged. A format module declares:

- ``PARTS``: the tensor names (last component) it reads for one weight;
- ``quantized(parts)``: whether a layer's parts hold a quantized weight (a format may leave
  some layers dense, e.g. ``lm_head``);
- ``tensor(config, prefix, parts)``: the ``QuantTensor``;
- ``IGNORED``: parts consumed by design without use (static activation scales: the engine
  runs activations in the model dtype).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from dist_engine.quant import method_module, parse_config


def checkpoint_quantization(path: str):
    """The checkpoint's typed quantization config, or None."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return None
    with open(cfg_file) as f:
        config = json.load(f)
    raw = config.get("quantization_config")
    if not raw or (raw.get("quant_method") == "fp8" and raw.get("weight_block_size")
                   and config.get("kv_lora_rank")):
        return None  # DeepSeek's block-scaled FP8: layers/fp8.py reads its tensors directly
    return parse_config(raw, path)


def logical_tensors(path: str, tensors: dict) -> Iterator[tuple[str, object]]:
    """(name, tensor) with each quantized layer's parts in ``tensors`` (name -> lazy slice)
    replaced by one ``<layer>.weight`` ``QuantTensor``."""
    cfg = checkpoint_quantization(path)
    if cfg is None:
        yield from tensors.items()
        return
    fmt = method_module(cfg.method)
    layers: dict[str, dict] = {}
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in fmt.PARTS:
            layers.setdefault(prefix, {})[leaf] = t
    consumed = set()
    for prefix, parts in layers.items():
        if not fmt.quantized(parts):
            continue
        yield f"{prefix}.weight", fmt.tensor(cfg, prefix, parts)
        consumed.update(f"{prefix}.{leaf}" for leaf in parts)
    for name, t in tensors.items():
        if name not in consumed:
            yield name, t
