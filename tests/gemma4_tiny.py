"""Tiny random Gemma 4 checkpoints for the tests and benchmarks: every parameter random, the ones
transformers initialises to a constant included (norm weights, layer scalars, router scales)."""

from __future__ import annotations

import json
import os

import torch

S, F = "sliding_attention", "full_attention"
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            head_dim=16, global_head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=1024,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, final_logit_softcapping=2.0,
            hidden_size_per_layer_input=0, tie_word_embeddings=True)
CONFIGS = {
    # global layers: 1 KV head of dim 32 with K = V (no v_proj); sliding: 2 KV heads of dim 16
    "dense": dict(num_hidden_layers=5, layer_types=[S, S, F, S, F], num_key_value_heads=2,
                  num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8),
    # the 26B-A4B's shape in small: 8 experts, top 2, beside a dense MLP in every layer
    "moe": dict(num_hidden_layers=4, layer_types=[S, F, S, F], num_key_value_heads=2,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
                intermediate_size=48),
    # an E model: per-layer embeddings, the last two layers reuse layers 3 (sliding) and 2
    # (full) K/V with double-wide MLPs; one KV head, v_proj on every layer
    "e": dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=1,
              sliding_window=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=320,
              num_kv_shared_layers=2, use_double_wide_mlp=True, attention_k_eq_v=False),
}


def text_config(name: str, **over):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**{**BASE, **CONFIGS[name], **over})


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from uniform logits; constant-initialised ones (norms, scalars, scales)
    spread around their constant so every path shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
            else:  # norm weights, router scale / per_expert_scale
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):  # a persistent buffer in transformers
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def make(name: str, path: str, seed: int = 0, multimodal: bool = False, **over) -> str:
    """Save tiny Gemma 4 ``name`` (a CONFIGS key) to ``path``; ``multimodal``: as the text part
    of a Gemma4ForConditionalGeneration with a (tiny) vision tower."""
    from transformers import (
        Gemma4Config,
        Gemma4ForCausalLM,
        Gemma4ForConditionalGeneration,
        Gemma4VisionConfig,
    )

    torch.manual_seed(seed)
    text = text_config(name, **over)
    if multimodal:
        vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, head_dim=8)
        model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=vision,
                                                            audio_config=None))
    else:
        model = Gemma4ForCausalLM(text)
    randomize(model, seed)
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path


def released_spelling(path: str) -> None:
    """Rewrite ``path``'s config.json as the published configs spell the global layers
    (``global_head_dim``, ``num_global_key_value_heads``) instead of ``per_layer_config``."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    text = raw.get("text_config", raw)
    plc = text.pop("per_layer_config")
    first = next(iter(plc.values()))
    text["global_head_dim"] = first["head_dim"]
    text["num_global_key_value_heads"] = first.get("num_key_value_heads")
    with open(file, "w") as f:
        json.dump(raw, f, indent=2)


def make_assistant(target: str, path: str, seed: int = 0, ordered: bool = True, **over) -> str:
    """Save a tiny random Gemma 4 assistant drafter for target ``target`` (a CONFIGS key) to
    ``path``: a sliding and a full layer reading the target's K/V, a smaller hidden size, and
    (``ordered``) the centroid-masked head with a random token ordering (transformers
    initialises it to zeros, which would put every token in cluster 0)."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    torch.manual_seed(seed)
    t = CONFIGS[target]
    text = text_config(target, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       layer_types=[S, F], num_kv_shared_layers=2, hidden_size_per_layer_input=0,
                       vocab_size_per_layer_input=0, use_double_wide_mlp=False, enable_moe_block=False,
                       num_experts=None, top_k_experts=None, moe_intermediate_size=None,
                       num_key_value_heads=t["num_key_value_heads"], **over)
    cfg = Gemma4AssistantConfig(text_config=text, backbone_hidden_size=BASE["hidden_size"],
                                use_ordered_embeddings=ordered, num_centroids=8,
                                centroid_intermediate_top_k=2)
    model = Gemma4AssistantForCausalLM(cfg)
    randomize(model, seed + 1)
    if ordered:
        g = torch.Generator().manual_seed(seed + 2)
        model.masked_embedding.token_ordering.copy_(torch.randperm(BASE["vocab_size"], generator=g))
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path
