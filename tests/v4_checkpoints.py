"""Tiny DeepSeek-V4 checkpoints for the tests: transformers' model with every parameter it
initialises to a constant randomised, saved in transformers' naming or DeepSeek's released one,
optionally with FP8 (UE8M0-scaled) weights, plus an MTP layer in the released naming."""

from __future__ import annotations

import json
import os
import shutil

import torch

# every layer type (sliding, compressed sparse at ratio 4, heavily compressed at 16), hash
# layers first; a 16-token window; the indexer keeps 3 rows (fewer than a query soon sees).
# Eight indexer heads: scores are sums of ReLUs, and with few heads exact ties at 0 are common
# (their order is the reference's topk's to choose)
TINY_V4 = dict(
    vocab_size=320, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
    head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8, o_groups=2, o_lora_rank=16,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], sliding_window=16, index_n_heads=8,
    index_head_dim=16, index_topk=3, hc_mult=2, partial_rotary_factor=0.5, max_position_embeddings=512,
    bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
# weights DeepSeek ships in FP8 (compressor, indexer keys, router: bf16)
FP8_LEAVES = ("attn.wq_a.", "attn.wq_b.", "attn.wkv.", "attn.wo_a.", "attn.wo_b.", "attn.indexer.wq_b.",
              ".w1.", ".w2.", ".w3.", ".e_proj.", ".h_proj.")


def random_v4(seed: int = 0, **over):
    """transformers' DeepseekV4ForCausalLM with random weights, constants included: norms
    around 1, sinks, compressor/indexer position biases, hyper-connection bases and scales,
    routing correction biases, and a hash table with distinct experts per token."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(**{**TINY_V4, **over})
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "position_bias" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
            elif name.endswith(".weight"):  # norms
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "scale" in name:  # hyper-connection scales
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:  # sinks, position biases, hyper-connection bases
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                                     for _ in range(cfg.vocab_size)]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def _released(name: str) -> str:
    """transformers' saved name -> DeepSeek's released one."""
    name = {"model.embed_tokens.weight": "embed.weight", "model.hc_head.hc_fn": "hc_head_fn",
            "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}.get(name, name)
    return name.removeprefix("model.")


def quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 with power-of-two (UE8M0) scales: (float8_e4m3fn weight, float8_e8m0fnu grid)."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    scale = torch.empty(rows, cols)
    q = torch.empty_like(w)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = 2.0 ** torch.ceil(torch.log2(tile.abs().max().clamp(min=1e-12) / 448.0))
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = tile / s
    return q.to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4: per 32 inputs a power-of-two scale (UE8M0) and E2M1 codes rounded to the nearest
    value, two per byte (first in the low nibble): (uint8 ``[N, K / 2]``, float8_e8m0fnu
    ``[N, K / 32]``)."""
    N, K = w.shape
    g = w.reshape(N, K // 32, 32)
    scale = 2.0 ** torch.ceil(torch.log2(g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 6.0))
    codes = (g / scale).unsqueeze(-1).sub(E2M1).abs().argmin(-1).reshape(N, K).to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale.squeeze(-1).to(torch.float8_e8m0fnu)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1).long()
    return E2M1[codes] * scale.float().repeat_interleave(32, 1)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return q.float() * s[:q.shape[0], :q.shape[1]]


def save_v4(model, path: str, naming: str = "transformers", fp8_block: int | None = None,
            extra: dict[str, torch.Tensor] | None = None, fp4_experts: bool = False) -> str:
    """Write ``model`` (and ``extra`` tensors, e.g. an MTP layer, in released names) to ``path``:
    transformers' naming (``model.`` prefix) or the ``released`` one; with ``fp8_block`` the
    FP8 leaves as float8 with UE8M0 scales (``*.scale`` released, ``*.weight_scale_inv``
    otherwise), else in fp32; with ``fp4_experts`` the routed experts in MXFP4 (packed bytes and
    UE8M0 ``*.scale``), flagged by ``expert_dtype: "fp4"``."""
    from safetensors.torch import load_file, save_file

    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    tensors = load_file(os.path.join(tmp, "model.safetensors"))
    cfg = json.load(open(os.path.join(tmp, "config.json")))
    shutil.rmtree(tmp)
    if extra:
        tensors.update({("model." + k if naming == "transformers" and not k.startswith("mtp.") else k): v
                        for k, v in extra.items()})
    out = {}
    for name, t in tensors.items():
        key = _released(name) if naming == "released" else name
        if fp4_experts and ".experts." in name and name.endswith((".w1.weight", ".w2.weight", ".w3.weight")):
            out[key], out[key[:-len(".weight")] + ".scale"] = quantize_mxfp4(t)
        elif fp8_block and t.dim() == 2 and any(leaf in "." + name for leaf in FP8_LEAVES):
            q, s = quantize_fp8(t, fp8_block)
            out[key] = q
            out[key[:-len(".weight")] + (".scale" if naming == "released" else ".weight_scale_inv")] = s
        else:
            out[key] = t.contiguous()
    if fp8_block:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                      "activation_scheme": "dynamic", "weight_block_size": [fp8_block, fp8_block]}
    if fp4_experts:
        (cfg["quantization_config"] if fp8_block else cfg)["expert_dtype"] = "fp4"
    os.makedirs(path, exist_ok=True)
    save_file(out, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def dequantized_copy(src: str, dst: str, block: int) -> str:
    """The checkpoint at ``src`` with every FP8 and MXFP4 weight replaced by its exact fp32
    value."""
    from safetensors.torch import load_file, save_file

    t = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, v in t.items():
        if v.dtype == torch.float8_e8m0fnu:
            continue
        if v.dtype == torch.uint8:
            v = dequantize_mxfp4(v, t[name[:-len(".weight")] + ".scale"])
        if v.dtype == torch.float8_e4m3fn:
            stem = name[:-len(".weight")]
            scale = t.get(stem + ".scale", t.get(stem + ".weight_scale_inv"))
            v = dequantize_fp8(v, scale, block)
        out[name] = v
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.pop("quantization_config", None)
    cfg.pop("expert_dtype", None)
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def random_mtp(seed: int = 5):
    """An MTP layer: (its window-only V4 block as transformers builds it, the 1-layer model
    holding it, and its tensors in released naming, ``mtp.0.*``)."""
    one = random_v4(seed, num_hidden_layers=1, layer_types=["sliding_attention"], mlp_layer_types=["moe"])
    g = torch.Generator().manual_seed(seed + 7)
    H = one.config.hidden_size
    tmp = f"/tmp/_v4_mtp_{os.getpid()}_{seed}"
    save_v4(one, tmp, naming="released")
    from safetensors.torch import load_file

    block = load_file(os.path.join(tmp, "model.safetensors"))
    shutil.rmtree(tmp)
    out = {"mtp.0." + k[len("layers.0."):]: v for k, v in block.items() if k.startswith("layers.0.")}
    out.update({"mtp.0.hc_head_fn": block["hc_head_fn"], "mtp.0.hc_head_base": block["hc_head_base"],
                "mtp.0.hc_head_scale": block["hc_head_scale"], "mtp.0.norm.weight": block["norm.weight"],
                "mtp.0.enorm.weight": 1 + 0.2 * torch.randn(H, generator=g),
                "mtp.0.hnorm.weight": 1 + 0.2 * torch.randn(H, generator=g),
                "mtp.0.e_proj.weight": torch.randn(H, H, generator=g) * 0.08,
                "mtp.0.h_proj.weight": torch.randn(H, H, generator=g) * 0.08})
    return one, out
