"""Quantized weights: one small module per checkpoint format, each "checkpoint tensors ->
``GroupQuant`` (codes, scales, offsets) -> packed weight -> product".

- ``groups.py``: the common decoded form, TP slicing on group boundaries, stacking, packing,
  and round-to-nearest int8 / int4 quantization (``--quantization int8|int4``).
- ``gguf.py``: GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, MXFP4, NVFP4).
- ``gptq.py``, ``awq.py``, ``compressed_tensors.py`` (pack-quantized int4/int8,
  int-quantized, float-quantized FP8, nvfp4/mxfp4-pack-quantized), ``fp8.py`` (per-tensor,
  per-channel and block FP8), ``modelopt.py`` (NVFP4 with ``weight_scale_2``, FP8).
- ``fp4.py``: MXFP4 / NVFP4 codes and scales (E2M1, UE8M0, E4M3) -> ``GroupQuant``: what any
  FP4 checkpoint reader calls (DeepSeek-V4's routed experts are MXFP4).
- ``packing.py``: sub-byte codes out of int32 words and bytes.
- ``checkpoint.py``: groups a checkpoint's tensors per layer for the loader.
- ``linear.py``: how layers hold and multiply them; the kernels are ``kernels/qlinear.*``.

DeepSeek-V3 and V4 block-scaled FP8 stays in ``layers/fp8.py`` (``ModelConfig.fp8_block``);
V4's MXFP4 routed experts are read by ``fp4.packed_mxfp4_weights``.
"""

from __future__ import annotations

import importlib
from typing import Any

# quant_method in config.json -> module of this package that reads it
CHECKPOINT_METHODS = {
    "gguf": "gguf",
    "gptq": "gptq",
    "awq": "awq",
    "compressed-tensors": "compressed_tensors",
    "fp8": "fp8",
    "modelopt": "modelopt",
}
ON_LOAD_METHODS = ("int8", "int4")  # --quantization of a float checkpoint
QUANTIZATION_CHOICES = ON_LOAD_METHODS + tuple(CHECKPOINT_METHODS)


def method_module(method: str):
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"quantization method {method!r} is not supported (supported: "
                         f"{', '.join(CHECKPOINT_METHODS)})")
    return importlib.import_module(f"dist_engine.quant.{CHECKPOINT_METHODS[method]}")


def parse_config(raw: dict[str, Any], path: str):
    """The typed config of a checkpoint's ``quantization_config`` (a frozen dataclass with a
    ``method`` field); an unknown or unsupported method is a ``ValueError`` naming it."""
    method = raw.get("quant_method")
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"{path}/config.json: quantization_config quant_method {method!r} is not "
                         f"supported (supported: {', '.join(CHECKPOINT_METHODS)})")
    try:
        return method_module(method).Config.from_dict(raw)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}/config.json: quantization_config for {method!r} is malformed "
                         f"({type(e).__name__}: {e})") from None
