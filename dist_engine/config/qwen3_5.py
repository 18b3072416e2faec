"""Qwen3.5 / Qwen 3.6 (transformers' ``qwen3_5`` and ``qwen3_5_moe``): how their config.json maps
onto ``ModelConfig``, and the checks of the hybrid fields.

The text-only classes keep every field at the top level; the conditional-generation ones (the
checkpoints Qwen publishes) nest them in ``text_config`` beside a ``vision_config`` this engine
does not use: their weights live under ``model.language_model.*`` and the vision tower's under
``model.visual.*`` (skipped at load). Layers are ``linear_attention`` (Gated DeltaNet) or
``full_attention`` (gated attention with partial rotary) as ``layer_types`` lists them.
"""

from __future__ import annotations

from typing import Any

QWEN3_5_TEXT = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")
QWEN3_5_MULTIMODAL = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
QWEN3_5_ARCHITECTURES = QWEN3_5_TEXT + QWEN3_5_MULTIMODAL
LAYER_TYPES = ("full_attention", "linear_attention")
# rope_parameters keys that are not a scaling method: the text part of the multimodal rotary
# (equal position ids on all three axes reduce it to plain rotary) and the rotated fraction
ROPE_LAYOUT_KEYS = ("partial_rotary_factor", "mrope_section", "mrope_interleaved")
# top-level settings of a conditional-generation config that its text_config may lack
INHERITED = ("bos_token_id", "eos_token_id")


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The flat text config of a Qwen3.5 config.json (``text_config`` merged over what the
    top level says of the whole model)."""
    arch = raw["architectures"][0]
    if arch not in QWEN3_5_MULTIMODAL:
        return raw
    if not isinstance(raw.get("text_config"), dict):
        raise ValueError(f"{arch} config.json has no text_config object")
    text = dict(raw["text_config"])
    for key in INHERITED:
        if text.get(key) is None and raw.get(key) is not None:
            text[key] = raw[key]
    if "tie_word_embeddings" in raw:  # the whole model's setting decides, as in transformers
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    text["architectures"] = [arch]
    return text


def hybrid_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` fields of a (flat) Qwen3.5 text config."""
    arch = raw["architectures"][0]
    layers = raw["num_hidden_layers"]
    types = raw.get("layer_types")
    if types is None:  # older configs: every ``full_attention_interval``-th layer attends
        every = raw.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
    if raw.get("mtp_use_dedicated_embeddings"):
        raise ValueError("mtp_use_dedicated_embeddings=true (an MTP layer with its own embedding) is "
                         "not supported; the MTP layer shares the model's embedding")
    rope = raw.get("rope_parameters") or {}
    n_heads = raw["num_attention_heads"]
    fields: dict[str, Any] = dict(
        layer_types=tuple(types),
        linear_num_key_heads=raw.get("linear_num_key_heads", 16),
        linear_num_value_heads=raw.get("linear_num_value_heads", 32),
        linear_key_head_dim=raw.get("linear_key_head_dim", 128),
        linear_value_head_dim=raw.get("linear_value_head_dim", 128),
        linear_conv_kernel_dim=raw.get("linear_conv_kernel_dim", 4),
        partial_rotary_factor=float(rope.get("partial_rotary_factor",
                                             raw.get("partial_rotary_factor", 0.25))),
        mtp_num_hidden_layers=raw.get("mtp_num_hidden_layers") or 0,
        multimodal=arch in QWEN3_5_MULTIMODAL,
        qk_norm=True,
        num_key_value_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // n_heads,
    )
    if "Moe" in arch:
        # every layer routes (softmax top-k, always renormalised) plus a sigmoid-gated shared expert
        fields.update(
            n_routed_experts=raw["num_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
            moe_intermediate_size=raw["moe_intermediate_size"], norm_topk_prob=True,
            moe_scoring="softmax", decoder_sparse_step=1,
            shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size") or 0,
            intermediate_size=raw.get("intermediate_size") or raw["moe_intermediate_size"])
    return fields


def rope_scaling(rope: dict[str, Any]) -> dict[str, Any]:
    """rope_parameters without the keys that describe the rotary layout rather than a scaling."""
    return {k: v for k, v in rope.items() if k not in ROPE_LAYOUT_KEYS}


def check_hybrid(cfg) -> None:
    """ValueErrors for a hybrid config that cannot work, naming the field and what to change."""
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise ValueError(f"layer_types lists {len(cfg.layer_types)} layers but num_hidden_layers is "
                         f"{cfg.num_hidden_layers}")
    for i, kind in enumerate(cfg.layer_types):
        if kind not in LAYER_TYPES:
            raise ValueError(f"layer {i} has layer_types entry {kind!r}, which is not supported "
                             f"(supported: {', '.join(LAYER_TYPES)})")
    if "linear_attention" in cfg.layer_types:
        for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
        if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads={cfg.linear_num_value_heads} must be a multiple of "
                             f"linear_num_key_heads={cfg.linear_num_key_heads} (each key head serves "
                             "a group of value heads)")
        if cfg.linear_conv_kernel_dim < 2:
            raise ValueError(f"linear_conv_kernel_dim must be >= 2, got {cfg.linear_conv_kernel_dim}")
    rot = cfg.rotary_dim
    if not 0 < cfg.partial_rotary_factor <= 1 or rot < 2 or rot % 2:
        raise ValueError(f"partial_rotary_factor={cfg.partial_rotary_factor} of head_dim={cfg.head_dim} "
                         f"rotates {rot} dims; it must be an even number between 2 and head_dim")
    if cfg.mtp_num_hidden_layers < 0:
        raise ValueError(f"mtp_num_hidden_layers must be >= 0, got {cfg.mtp_num_hidden_layers}")
    if cfg.shared_expert_intermediate_size < 0:
        raise ValueError("shared_expert_intermediate_size must be >= 0")
