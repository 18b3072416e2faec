"""Quantized weights inside the engine's layers: loading, packing, products.

A layer's ``load`` receives a ``GroupQuant`` slice where the checkpoint keeps the weight
quantized (``take``); once every tensor is read, ``finalize`` stacks each layer's parts (q/k/v,
gate/up) into one weight and packs it for the kernels (``weight_packed`` becomes a
``QWeight``; the dense parameter is emptied). ``--quantization int8|int4`` quantizes dense
layers the same way after loading (``quantize_dense``).

Products (``apply``): on CPU the C kernels (``kernels/qlinear.c``) against fp32 / bf16
activations, or int8 activations where ``int8_activations`` is set and the machine has VNNI;
elsewhere the layer's weight is dequantized for the call (torch operators, any device), and
on CUDA, FP8 weights go through ``torch._scaled_mm`` where the GPU has it.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.kernels import qlinear
from dist_engine.quant.groups import GroupQuant, fitting_group, quantize

log = logging.getLogger(__name__)

ON_LOAD = {"int8": (8, 32, True), "int4": (4, 32, False)}  # bits, group, symmetric


def take(module: nn.Module, part: GroupQuant, dst: int) -> None:
    """Keep ``part`` for local output rows ``[dst, dst + rows)`` of ``module``'s weight."""
    parts = module.__dict__.setdefault("_quant_parts", {})
    parts[dst] = part


def finalize(root: nn.Module) -> None:
    """Stack and pack the quantized parts every layer under ``root`` received."""
    for module in root.modules():
        parts = module.__dict__.pop("_quant_parts", None)
        if not parts:
            continue
        rows = module.weight.shape[0]
        order = sorted(parts)
        got = [parts[d] for d in order]
        ends = [d + p.shape[0] for d, p in zip(order, got)]
        if ends[-1] > rows or any(e > d for e, d in zip(ends, order[1:])):
            raise ValueError(f"quantized parts {[(d, p.shape) for d, p in parts.items()]} overlap or "
                             f"exceed the {rows} output rows of {type(module).__name__}")
        if sum(p.shape[0] for p in got) == rows:
            set_packed(module, GroupQuant.cat(got).pack())
        else:  # dense parts beside quantized ones in one fused weight (the loader checked that
            # every part arrived): one product must hold one form, so the layer stays dense
            _mixed_dense(module, parts)
    for module in root.modules():  # a head tied to a quantized table reads the same weight
        tied = getattr(module, "tied", None)
        if tied is not None and module.weight_packed is None and tied.weight_packed is not None:
            module.weight_packed = tied.weight_packed
            module.weight = tied.weight  # the emptied table, not the dense one it replaced


def _mixed_dense(module: nn.Module, parts: dict[int, GroupQuant]) -> None:
    """A fused weight whose checkpoint keeps some parts dense (e.g. FP8 Qwen3.5 checkpoints
    leave Gated DeltaNet's ``in_proj_a`` / ``in_proj_b`` unconverted beside a quantized
    ``in_proj_qkv`` / ``in_proj_z``): the quantized parts' exact values written into the dense
    weight beside the dense rows."""
    w = module.weight.data  # [out, in]
    for dst, part in parts.items():
        w[dst:dst + part.shape[0]] = part.dequantize().to(w.dtype)
    log.info("%s: %d of %d rows quantized, the rest dense in the checkpoint; held dense (%s)",
             type(module).__name__, sum(p.shape[0] for p in parts.values()), w.shape[0],
             next(iter(parts.values())).fmt)


def set_packed(module: nn.Module, qw: qlinear.QWeight) -> None:
    device = module.weight.device
    if device.type != "cpu":
        qw = qw.to(device)
        if device.type == "cuda":
            build_int4pack(qw)
    module.weight_packed = qw
    module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)


def prepare(root: nn.Module, quantization: str | None, int8_activations: bool,
            features: tuple[str, ...] = ()) -> None:
    """After loading: quantize a float checkpoint (``--quantization``), then switch the
    products to int8 activations (``--int8-activations``) where they take it. ``features``:
    what is on whose output is token for token that of plain decoding only with float
    activations (speculation, prefix caching), named in a warning."""
    if quantization is not None:
        quantize_dense(root, quantization)
    if not int8_activations:
        return
    if not use_int8_activations(root):
        log.warning("--int8-activations: no weight takes int8 activations here (it needs an "
                    "AVX-512 VNNI CPU and 4/8-bit weights); the products stay in float")
    elif features:
        log.warning("--int8-activations with %s: the activation rounding magnifies last-bit "
                    "differences between decode, verification and prefix-hit steps, so greedy "
                    "output can part from plain decoding (docs/quantization.md)", " and ".join(features))


def quantize_dense(root: nn.Module, method: str) -> None:
    """``--quantization``: group-quantize every dense product weight under ``root`` (layers
    whose ``weight_packed`` is still None; the embedding lookup table stays dense). A layer with
    ``quant_min_bits`` (the LM head: 8) keeps at least that many bits, as llama.cpp's 4-bit
    files keep the output tensor at 6-8 bits: the shipped Q4_1 default model with its head at
    4 bits read perplexity 39.2 instead of 36.7."""
    for module in root.modules():
        bits, group, symmetric = ON_LOAD[method]
        if bits < getattr(module, "quant_min_bits", 0):
            bits, group, symmetric = ON_LOAD["int8"]
        if not hasattr(module, "weight_packed") or module.weight_packed is not None:
            continue
        w = module.weight
        if getattr(module, "keep_dense", False) or w.dim() != 2 or not w.numel():
            continue
        if fitting_group(w.shape[1], group) is None:
            log.warning("%s: %d inputs a row do not split into groups of a multiple of 8; this "
                        "layer stays %s", type(module).__name__, w.shape[1], w.dtype)
            continue
        set_packed(module, quantize(w.detach(), bits, group, symmetric).pack())


def use_int8_activations(root: nn.Module) -> int:
    """``--int8-activations``: CPU products of the quantized weights under ``root`` quantize
    each activation row to int8 per 32 inputs (llama.cpp's arithmetic) where the kernel takes
    the weight and the machine has VNNI. Returns how many weights switched."""
    if not qlinear.has_int8_activations():
        return 0
    n = 0
    for m in root.modules():
        qw = getattr(m, "weight_packed", None)
        if isinstance(qw, qlinear.QWeight) and qlinear.int8_activations_apply(qw) and not qw.int8_activations:
            m.weight_packed = dataclasses.replace(qw, int8_activations=True)
            n += 1
    return n


def apply(module: nn.Module, qw: qlinear.QWeight, x: torch.Tensor,
          bias: torch.Tensor | None) -> torch.Tensor:
    """``x Wᵀ + b`` for ``x`` ``[T, in]`` against a quantized weight."""
    if x.device.type == "cpu" and qlinear.available() and x.dtype in (torch.float32, torch.bfloat16):
        return qlinear.linear(x, qw, bias, int8_activations=qw.int8_activations)
    if x.device.type == "cuda":
        y = _scaled_mm(qw, x, bias) if qw.kind == qlinear.E4M3 else _int4pack_mm(qw, x, bias)
        if y is not None:
            return y
    if qw.in_perm is not None:
        x = x.index_select(-1, qw.in_perm)
    return F.linear(x, qlinear.dequantize(qw, x.dtype), bias)


def _scaled_mm(qw: qlinear.QWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """FP8 with one scale per output row (per-channel / per-tensor) through ``torch._scaled_mm``
    on GPUs with FP8 tensor cores; None where it does not apply."""
    if qw.group != qw.in_features or qw.offsets is not None or torch.cuda.get_device_capability(x.device) < (8, 9):
        return None
    cache = qw.__dict__.get("_fp8_dense")
    if cache is None:  # [out, in] FP8 and its per-row scales, once
        w = qlinear.unpack_codes(qw).mul(256.0).to(torch.float8_e4m3fn)  # values, unscaled
        scale = qw.scales.float().transpose(1, 2).reshape(-1)[:qw.out_features] / 256.0
        cache = qw.__dict__["_fp8_dense"] = (w, scale.view(1, -1).contiguous())
    w, w_scale = cache
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    x_scale = amax / torch.finfo(torch.float8_e4m3fn).max
    xq = (x.float() / x_scale).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
    return y if bias is None else y + bias


_INT4PACK = {"ok": True}  # off for the process if torch's tinygemm kernel disagrees once


def _int4pack_mm(qw: qlinear.QWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """4-bit codes 0..15 against bf16 activations through torch's tinygemm kernel
    (``_weight_int4pack_mm``), where ``build_int4pack`` made its layout at load."""
    cache = qw.__dict__.get("_int4pack")
    if cache is None or not _INT4PACK["ok"] or x.dtype != torch.bfloat16 or x.dim() != 2:
        return None
    packed, sz = cache
    y = torch._weight_int4pack_mm(x.contiguous(), packed, qw.group, sz)
    return y if bias is None else y + bias


def build_int4pack(qw: qlinear.QWeight) -> None:
    """CUDA: repack 4-bit codes 0..15 with offsets (Q4_1, AWQ, GPTQ, int4) for torch's tinygemm
    kernel (W = (q - 8) * scale + zero), checked once against the dequantized product; on any
    failure the process keeps dequantizing per call."""
    if (not _INT4PACK["ok"] or qw.kind != qlinear.U4 or qw.lut is not None or qw.in_perm is not None
            or qw.group not in (32, 64, 128, 256)):
        return
    tiles = next((t for t in (8, 4, 2) if qw.in_features % (t * 16) == 0), None)
    if tiles is None:
        return
    try:
        q = qlinear.unpack_codes(qw).to(torch.int32)  # [N, K] codes 0..15
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        P, groups = qw.scales.shape[:2]
        grid = lambda t: t.float().transpose(1, 2).reshape(P * 16, groups)[:qw.out_features]  # noqa: E731
        s = grid(qw.scales)
        z = (grid(qw.offsets) if qw.offsets is not None else torch.zeros_like(s)) + 8 * s
        sz = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/G, N, 2]
        probe = torch.randn(4, qw.in_features, device=qw.device, dtype=torch.bfloat16)
        want = F.linear(probe, qlinear.dequantize(qw, torch.bfloat16)).float()
        got = torch._weight_int4pack_mm(probe, packed, qw.group, sz).float()
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
            raise ValueError("its result differs from the dequantized product")
        qw.__dict__["_int4pack"] = (packed, sz)
    except (RuntimeError, ValueError, AttributeError) as e:
        _INT4PACK["ok"] = False
        log.warning("torch's int4 weight-only kernel is not used (%s); dequantizing per call", e)


def format_bytes(roots: list[nn.Module]) -> dict[str, int]:
    """Bytes of weights per format (``"float32"``, ``"gguf Q4_1"``...) under ``roots``."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for root in roots:
        for p in root.parameters():
            if id(p) not in seen and p.numel():
                seen.add(id(p))
                key = str(p.dtype).replace("torch.", "")
                out[key] = out.get(key, 0) + p.numel() * p.element_size()
        for m in root.modules():
            packed = getattr(m, "weight_packed", None)
            if packed is None or id(packed) in seen:
                continue
            seen.add(id(packed))
            if isinstance(packed, qlinear.QWeight):
                key = packed.fmt or "quantized"
            elif hasattr(packed, "panels"):
                key = f"{str(packed.panels.dtype).replace('torch.', '')} (packed)"
            else:
                key = "float32 (oneDNN packed)"
            out[key] = out.get(key, 0) + _nbytes(packed)
    return out


def _nbytes(packed) -> int:
    return packed.nbytes if hasattr(packed, "nbytes") else packed.numel() * packed.element_size()
