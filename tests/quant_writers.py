"""Tiny quantized checkpoints for the format tests, each with the float model that holds the
weights its format stands for (the reference the engine is compared with).

compressed-tensors checkpoints are written by the compressed-tensors library itself (scales
from its own ``calculate_qparams``, packed by its compressors) and dequantized by it for the
reference; GPTQ, AWQ, ModelOpt and FP8 ones (whose tools need a GPU) by the code below,
following each format's published layout, with a reference dequantizer of its own.
"""

from __future__ import annotations

import json
import os

import torch
import transformers
from safetensors.torch import save_file

CONFIG = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def float_model(seed: int = 0, arch: str = "LlamaConfig"):
    cfg = getattr(transformers, arch)(**CONFIG)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() > 1 else p.normal_(1.0, 0.1)
    return model


def linears(model):
    return [(n, m) for n, m in model.named_modules() if n.split(".")[-1] in LINEARS]


def compressed_tensors_checkpoint(path: str, **weights) -> torch.nn.Module:
    """``weights``: compressed-tensors ``QuantizationArgs`` for every linear layer but the
    head. Returns the model holding the library's own dequantization of what it saved."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    model = float_model()
    args = QuantizationArgs(**weights)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for _, m in linears(model):
        w = m.weight.data
        N, K = w.shape
        glob = None
        if args.strategy in ("group", "tensor_group"):
            g = w.view(N, K // args.group_size, args.group_size)
            lo, hi = g.amin(-1), g.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            lo, hi = w.min().reshape(1), w.max().reshape(1)
        if args.strategy == "tensor_group":
            glob = generate_gparam(w.min(), w.max()).reshape(1)
            m.weight_global_scale.data.copy_(glob)
        scale, zero = calculate_qparams(lo, hi, args, global_scale=glob)
        m.weight_scale.data.copy_(scale.to(m.weight_scale.dtype))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zero.to(m.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    compressor.decompress_model(model)  # the library's dequantizer: the reference weights
    if args.strategy == "tensor_group":  # the library dequantizes NVFP4 in bf16: redo in fp32
        _nvfp4_fp32(model, path)
    return model.float()


def _nvfp4_fp32(model, path: str) -> None:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for name, m in linears(model):
            packed = f.get_tensor(f"{name}.weight_packed")
            codes = torch.stack([packed & 15, packed >> 4], -1).view(packed.shape[0], -1).long()
            scale = f.get_tensor(f"{name}.weight_scale").float() / f.get_tensor(f"{name}.weight_global_scale").float()
            N, K = codes.shape
            m.weight.data = (E2M1[codes].view(N, K // 16, 16) * scale.unsqueeze(-1)).view(N, K)


def _save(model, path: str, tensors: dict, quantization_config: dict) -> None:
    """Dense tensors of ``model`` except the linear weights named in ``tensors``, + config."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name in list(state):
        if name.rsplit(".", 1)[0] + ".weight" in {k.rsplit(".", 1)[0] + ".weight" for k in tensors}:
            state.pop(name, None)
    state.update(tensors)
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[R, C]`` -> int32 ``[R * bits / 32, C]``: 32 / bits rows per word."""
    per = 32 // bits
    c = codes.to(torch.int64).view(-1, per, codes.shape[1])
    return _int32(sum(c[:, i] << (bits * i) for i in range(per)))


def _int32(word: torch.Tensor) -> torch.Tensor:
    """32-bit patterns held in int64 -> int32 with the same bits."""
    return (word - (word >= 2 ** 31).long() * 2 ** 32).to(torch.int32)


def gptq_checkpoint(path: str, bits: int = 4, group: int = 32, act_order: bool = False,
                    v2: bool = False) -> torch.nn.Module:
    """Random GPTQ codes, zeros and fp16 scales; with ``act_order`` a random g_idx that gives
    every group ``group`` inputs, shared by the layers that read one input (GPTQ orders the
    inputs by their Hessian). Returns the float model of ``(q - zero) * scale``. (The original
    format stores zero - 1, so zero 0 cannot be stored: zeros are drawn from 1.)"""
    model = float_model()
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    orders: dict[str, torch.Tensor] = {}
    for name, m in linears(model):
        N, K = m.weight.shape
        q = torch.randint(0, 2 ** bits, (K, N), generator=gen)
        zero = torch.randint(0 if v2 else 1, 2 ** bits, (K // group, N), generator=gen)
        scale = (torch.rand(K // group, N, generator=gen) * 0.004 + 0.002).half()
        g_idx = torch.arange(K) // group
        if act_order:  # one order per layer input: q/k/v share one, gate/up another
            parent, leaf = name.rsplit(".", 1)
            key = parent + {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(leaf, leaf)
            g_idx = orders.setdefault(key, g_idx[torch.randperm(K, generator=gen)])
        m.weight.data = ((q - zero[g_idx]).float() * scale.float()[g_idx]).T.contiguous()
        stored = zero - (0 if v2 else 1)  # the original format stores zero - 1
        tensors.update({f"{name}.qweight": _pack_rows(q, bits),
                        f"{name}.qzeros": _pack_rows(stored.T & (2 ** bits - 1), bits).T.contiguous(),
                        f"{name}.scales": scale, f"{name}.g_idx": g_idx.to(torch.int32)})
    _save(model, path, tensors, {"quant_method": "gptq", "bits": bits, "group_size": group,
                                 "desc_act": act_order, "sym": False,
                                 "checkpoint_format": "gptq_v2" if v2 else "gptq"})
    return model


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output 8c + AWQ_ORDER[i]


def _awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, C]`` -> int32 ``[R, C / 8]`` in AWQ's interleaved nibble order."""
    c = codes.to(torch.int64).view(codes.shape[0], -1, 8)
    return _int32(sum(c[:, :, AWQ_ORDER[i]] << (4 * i) for i in range(8)))


def awq_checkpoint(path: str, group: int = 32) -> torch.nn.Module:
    model = float_model()
    gen = torch.Generator().manual_seed(2)
    tensors = {}
    for name, m in linears(model):
        N, K = m.weight.shape
        q = torch.randint(0, 16, (K, N), generator=gen)
        zero = torch.randint(0, 16, (K // group, N), generator=gen)
        scale = (torch.rand(K // group, N, generator=gen) * 0.004 + 0.002).half()
        g = torch.arange(K) // group
        m.weight.data = ((q - zero[g]).float() * scale.float()[g]).T.contiguous()
        tensors.update({f"{name}.qweight": _awq_pack(q), f"{name}.qzeros": _awq_pack(zero),
                        f"{name}.scales": scale})
    _save(model, path, tensors, {"quant_method": "awq", "bits": 4, "group_size": group,
                                 "zero_point": True, "version": "gemm"})
    return model


def fp8_checkpoint(path: str, scheme: str) -> torch.nn.Module:
    """``scheme``: "tensor" (vLLM / ModelOpt: a scalar scale), "channel" or "block" (128 x 32
    tiles as ``weight_scale_inv``)."""
    model = float_model()
    tensors = {}
    for name, m in linears(model):
        w = m.weight.data
        N, K = w.shape
        if scheme == "block":
            tiles = w.view(N // 32, 32, K // 32, 32).abs().amax((1, 3))
            scale = tiles / 448
            full = scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
        else:
            scale = w.abs().amax() / 448 if scheme == "tensor" else w.abs().amax(1, keepdim=True) / 448
            full = scale
        q = (w / full).to(torch.float8_e4m3fn)
        m.weight.data = q.float() * full
        key = "weight_scale_inv" if scheme == "block" else "weight_scale"
        tensors.update({f"{name}.weight": q, f"{name}.{key}": scale.float(),
                        f"{name}.input_scale": torch.tensor(0.02)})
    cfg = {"quant_method": "fp8", "activation_scheme": "static"}
    if scheme == "block":
        cfg["weight_block_size"] = [32, 32]
    _save(model, path, tensors, cfg)
    return model


E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def modelopt_nvfp4_checkpoint(path: str) -> torch.nn.Module:
    """Random E2M1 codes, E4M3 scales per 16 and a global ``weight_scale_2``."""
    model = float_model()
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name, m in linears(model):
        N, K = m.weight.shape
        codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
        scale = (torch.rand(N, K // 16, generator=gen) * 2 + 0.5).to(torch.float8_e4m3fn)
        glob = torch.tensor(0.01)
        m.weight.data = (E2M1[codes.long()].view(N, K // 16, 16) * scale.float().unsqueeze(-1)
                         * glob).view(N, K)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        tensors.update({f"{name}.weight": packed, f"{name}.weight_scale": scale,
                        f"{name}.weight_scale_2": glob, f"{name}.input_scale": torch.tensor(0.03)})
    _save(model, path, tensors, {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                 "exclude_modules": ["lm_head"]})
    return model


def fp8_block_copy(src: str, dst: str, dense=lambda name: False, block: int = 32) -> dict:
    """A block-FP8 copy (``quant_method: fp8``, ``weight_scale_inv`` tiles of ``block`` x
    ``block``, a partial last tile row where the rows do not fill one) of the float checkpoint
    folder ``src``: every 2-D weight with whole tiles of inputs but the embedding, the head,
    the MoE router and those ``dense(name)`` picks, as Qwen's FP8 releases leave some layers unconverted
    (``modules_to_not_convert``). Returns name -> the float values the FP8 weights stand for."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    values, out = {}, {}
    for file in sorted(f for f in os.listdir(dst) if f.endswith(".safetensors")):
        for name, w in load_file(os.path.join(dst, file)).items():
            if (w.dim() != 2 or not name.endswith(".weight") or "embed_tokens" in name or "lm_head" in name
                    or name.endswith("mlp.gate.weight") or name.startswith("mtp.") or dense(name)
                    or w.shape[1] % block):  # (inputs in whole tiles, as real checkpoints have)
                out[name] = w
                continue
            N, K = w.shape
            rows = torch.arange(N) // block
            tiles = torch.stack([w[rows == i].abs().view(-1, K // block, block).amax((0, 2))
                                 for i in range(-(-N // block))])  # [ceil(N / B), K / B]
            scale = tiles / 448
            full = scale[rows].repeat_interleave(block, 1)
            q = (w / full).to(torch.float8_e4m3fn)
            out[name], out[name[:-len("weight")] + "weight_scale_inv"] = q, scale
            values[name] = q.float() * full
        os.remove(os.path.join(dst, file))
    save_file(out, os.path.join(dst, "model.safetensors"))
    for index in (f for f in os.listdir(dst) if f.endswith(".index.json")):
        os.remove(os.path.join(dst, index))
    with open(os.path.join(dst, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    return values
