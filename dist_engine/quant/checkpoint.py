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

import functools
import json
import os
from collections.abc import Callable, Iterator

from dist_engine.config.deepseek_v4 import V4_ARCHITECTURES
from dist_engine.quant import method_module, parse_config
from dist_engine.quant.fp4 import SCALE_LEAVES, packed_mxfp4_weights


def _config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return {}
    with open(cfg_file) as f:
        return json.load(f)


def _deepseek_block_fp8(config: dict, raw: dict) -> bool:
    """DeepSeek-V3/V4's block-scaled FP8: layers/fp8.py reads its tensors directly."""
    return (raw.get("quant_method") == "fp8" and bool(raw.get("weight_block_size"))
            and (bool(config.get("kv_lora_rank")) or V4_ARCHITECTURES[0] in (config.get("architectures") or [])))


def checkpoint_quantization(path: str):
    """The checkpoint's typed quantization config, or None."""
    config = _config(path)
    raw = config.get("quantization_config")
    if not raw or _deepseek_block_fp8(config, raw):
        return None
    return parse_config(raw, path)


def fp4_experts(path: str) -> bool:
    """DeepSeek-V4 with MXFP4 routed experts (``expert_dtype: "fp4"``, top level or in the
    quantization config)."""
    config = _config(path)
    quant = config.get("quantization_config") or {}
    return (V4_ARCHITECTURES[0] in (config.get("architectures") or [])
            and quant.get("expert_dtype", config.get("expert_dtype")) == "fp4")


def logical_view(path: str) -> Callable[[dict], Iterator[tuple[str, object]]]:
    """What ``logical_tensors`` does for this checkpoint, with its config read once: a function
    of one group of tensors (name -> tensor or lazy slice), e.g. one paged expert's."""
    cfg = checkpoint_quantization(path)
    if cfg is None:
        return packed_mxfp4_weights if fp4_experts(path) else lambda tensors: iter(tensors.items())
    return functools.partial(_grouped, cfg, method_module(cfg.method))


def logical_name(path: str) -> Callable[[str], str]:
    """The name a stored tensor of this checkpoint is loaded under: a quantized weight's parts
    (GPTQ's ``gate_proj.qzeros``, MXFP4's ``w1.scale``...) all feed ``<layer>.weight``."""
    cfg = checkpoint_quantization(path)
    if cfg is not None:
        leaves = set(method_module(cfg.method).PARTS)
    elif fp4_experts(path):
        leaves = {"weight", *SCALE_LEAVES}
    else:
        return lambda name: name

    def name(stored: str) -> str:
        stem, _, leaf = stored.rpartition(".")
        return f"{stem}.weight" if leaf in leaves else stored
    return name


def logical_tensors(path: str, tensors: dict) -> Iterator[tuple[str, object]]:
    """(name, tensor) with each quantized layer's parts in ``tensors`` (name -> lazy slice)
    replaced by one ``<layer>.weight`` ``QuantTensor``."""
    return logical_view(path)(tensors)


def _grouped(cfg, fmt, tensors: dict) -> Iterator[tuple[str, object]]:
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
