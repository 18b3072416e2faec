"""Gemma 4 (transformers' ``gemma4``): how its config.json maps onto ``ModelConfig``.

``Gemma4ForCausalLM`` keeps the text fields at the top level; ``Gemma4ForConditionalGeneration``
(the published checkpoints) nests them in ``text_config`` beside vision / audio configs whose
towers this engine does not load (text weights live under ``model.language_model.*``).

Layers are ``sliding_attention`` or ``full_attention`` (``layer_types``; by default five sliding
to one full, the last layer always full). Full ("global") layers may have their own head dim and
KV-head count. Two spellings say so: released configs carry ``global_head_dim`` (transformers'
default 512 when absent) and ``num_global_key_value_heads`` (applied only with
``attention_k_eq_v``, as transformers does); transformers 5.25 writes ``per_layer_config``, a
sparse map from layer index (zero-padded strings) to the attributes that differ there. Each RoPE
setting belongs to a layer type (``rope_parameters.{sliding_attention, full_attention}``).

The small E models add per-layer embeddings (``hidden_size_per_layer_input``) and let the last
``num_kv_shared_layers`` layers read the K/V of the last earlier layer of their type.
"""

from __future__ import annotations

from typing import Any

GEMMA4_TEXT = ("Gemma4ForCausalLM",)
GEMMA4_MULTIMODAL = ("Gemma4ForConditionalGeneration",)
GEMMA4_ARCHITECTURES = GEMMA4_TEXT + GEMMA4_MULTIMODAL
SLIDING, FULL = "sliding_attention", "full_attention"
# top-level settings of a conditional-generation config that its text_config may lack
INHERITED = ("tie_word_embeddings", "bos_token_id", "eos_token_id")
# what a per_layer_config entry may override (the rest of a layer is the model's)
LAYER_OVERRIDES = ("head_dim", "num_key_value_heads")
DEFAULT_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The flat text config of a Gemma 4 config.json (``text_config`` over the top level's
    whole-model settings), with ``multimodal`` set for the conditional-generation class."""
    arch = raw["architectures"][0]
    if arch not in GEMMA4_MULTIMODAL:
        return raw
    if not isinstance(raw.get("text_config"), dict):
        raise ValueError(f"{arch} config.json has no text_config object")
    text = {k: raw[k] for k in INHERITED if k in raw}
    text.update(raw["text_config"])
    # stop at the end-of-turn ids the whole model names as well as the text model's own
    eos = [e for part in (raw["text_config"].get("eos_token_id"), raw.get("eos_token_id"))
           for e in (part if isinstance(part, list) else [part] if part is not None else [])]
    if eos:
        text["eos_token_id"] = list(dict.fromkeys(eos))
    text["architectures"] = [arch]
    text["multimodal_towers"] = tuple(t for t in ("vision", "audio") if raw.get(f"{t}_config"))
    return text


def layer_types(text: dict[str, Any]) -> tuple[str, ...]:
    n = text["num_hidden_layers"]
    types = list(text.get("layer_types") or
                 [SLIDING if (i + 1) % 6 else FULL for i in range(n)])  # transformers' default 5:1
    if len(types) != n:
        raise ValueError(f"layer_types lists {len(types)} layers, num_hidden_layers is {n}")
    unknown = sorted(set(types) - {SLIDING, FULL})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not Gemma 4 layer types ({SLIDING}, {FULL})")
    types[-1] = FULL  # transformers forces the last layer to attend globally
    return tuple(types)


def _per_layer_attention(text: dict[str, Any], types: tuple[str, ...]
                         ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(head dim, KV heads) of every layer, from either spelling."""
    head_dim = text.get("head_dim", 256)  # transformers' defaults where a field is absent
    kv = text.get("num_key_value_heads", 4)
    dims, heads = [head_dim] * len(types), [kv] * len(types)
    plc = text.get("per_layer_config")
    if plc is None:  # released configs: the global layers' own fields
        global_dim = text.get("global_head_dim") or 512
        global_kv = text.get("num_global_key_value_heads") if text.get("attention_k_eq_v") else None
        overrides = {i: {"head_dim": global_dim, **({"num_key_value_heads": global_kv} if global_kv else {})}
                     for i, t in enumerate(types) if t == FULL}
    else:
        if not isinstance(plc, dict):
            raise ValueError(f"per_layer_config must map layer indices to overrides, got {type(plc).__name__}")
        overrides = {}
        for key, attrs in plc.items():
            if not str(key).isdigit() or not int(key) < len(types):
                raise ValueError(f"per_layer_config key {key!r} is not a layer index below {len(types)}")
            unknown = sorted(set(attrs) - set(LAYER_OVERRIDES))
            if unknown:
                raise ValueError(f"per_layer_config[{key!r}] overrides {unknown}; only "
                                 f"{', '.join(LAYER_OVERRIDES)} may differ between Gemma 4 layers")
            overrides[int(key)] = attrs
    for i, attrs in overrides.items():
        dims[i] = attrs.get("head_dim", dims[i])
        heads[i] = attrs.get("num_key_value_heads", heads[i])
    for t in set(types):  # one rotary table per layer type
        if len({d for d, lt in zip(dims, types) if lt == t}) > 1:
            raise ValueError(f"the {t} layers have different head dims {sorted(set(dims))}; each layer "
                             "type needs one (its rotary embedding is shared)")
    return tuple(dims), tuple(heads)


def _rope(text: dict[str, Any], types: tuple[str, ...]) -> tuple[tuple[str, float, tuple | None], ...]:
    """(layer type, theta, sorted scaling items or None for plain RoPE) per layer type."""
    params = text.get("rope_parameters") or DEFAULT_ROPE
    out = []
    for t in sorted(set(types)):
        p = dict(params.get(t) or {})
        if "rope_theta" not in p:
            raise ValueError(f"rope_parameters has no rope_theta for the {t} layers")
        theta = float(p.pop("rope_theta"))
        scaling = None if p.get("rope_type", "default") == "default" else tuple(sorted(p.items()))
        out.append((t, theta, scaling))
    return tuple(out)


def gemma4_fields(text: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments of a flat Gemma 4 text config."""
    if text.get("use_bidirectional_attention") == "all":
        raise ValueError("use_bidirectional_attention='all' makes every token see every other: an "
                         "encoder, not a generator; this engine decodes causal Gemma 4 models only")
    types = layer_types(text)
    dims, heads = _per_layer_attention(text, types)
    rope = _rope(text, types)
    full_theta, full_scaling = next((th, sc) for t, th, sc in rope if t == FULL)
    moe = {}
    if text.get("enable_moe_block"):
        moe = dict(n_routed_experts=text["num_experts"], num_experts_per_tok=text["top_k_experts"],
                   moe_intermediate_size=text["moe_intermediate_size"], norm_topk_prob=True,
                   moe_scoring="softmax")
    first = next((i for i, t in enumerate(types) if t == SLIDING), 0)
    return dict(
        layer_types=types, layer_head_dims=dims, layer_kv_heads=heads,
        # the model-wide fields name the sliding layers' (the most common) shape
        head_dim=dims[first], num_key_value_heads=heads[first],
        rope_theta=full_theta, rope_scaling=full_scaling, rope_by_layer_type=rope,
        hidden_act=text.get("hidden_activation", "gelu_pytorch_tanh"),
        sliding_window=text.get("sliding_window", 512),
        attention_k_eq_v=bool(text.get("attention_k_eq_v", False)),
        num_kv_shared_layers=text.get("num_kv_shared_layers") or 0,
        hidden_size_per_layer_input=text.get("hidden_size_per_layer_input", 256) or 0,
        vocab_size_per_layer_input=text.get("vocab_size_per_layer_input", 262_144) or 0,
        final_logit_softcapping=text.get("final_logit_softcapping") or None,
        use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        multimodal_towers=tuple(text.get("multimodal_towers", ())),
        tie_word_embeddings=text.get("tie_word_embeddings", True),
        **moe,
    )


def kv_sources(cfg) -> tuple[int | None, ...]:
    """Per layer: the earlier layer whose K/V it reads (the last layer of its type before the
    shared ones), or None where it keeps its own."""
    n, shared = cfg.num_hidden_layers, cfg.num_kv_shared_layers
    if not 0 <= shared < n:
        raise ValueError(f"num_kv_shared_layers={shared} must be in [0, num_hidden_layers={n}): "
                         "some layer has to compute the K/V the others share")
    first = n - shared
    out: list[int | None] = [None] * first
    for i in range(first, n):
        src = next((j for j in reversed(range(first)) if cfg.layer_types[j] == cfg.layer_types[i]), None)
        if src is None:
            raise ValueError(f"layer {i} ({cfg.layer_types[i]}) shares K/V, but no layer before "
                             f"layer {first} is of its type to compute them")
        out.append(src)
    return tuple(out)


def check(cfg) -> None:
    """Cross-field checks of a Gemma 4 ``ModelConfig``."""
    if cfg.hidden_act != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation={cfg.hidden_act!r} is not supported for Gemma 4; "
                         "only 'gelu_pytorch_tanh'")
    for i, kv in enumerate(cfg.layer_kv_heads):
        if kv <= 0 or cfg.num_attention_heads % kv:
            raise ValueError(f"layer {i}: num_attention_heads={cfg.num_attention_heads} must be a "
                             f"multiple of its {kv} KV heads")
    if "sliding_attention" in cfg.layer_types and not cfg.sliding_window:
        raise ValueError("Gemma 4 sliding_attention layers need a positive sliding_window")
    if cfg.hidden_size_per_layer_input and cfg.vocab_size_per_layer_input < cfg.vocab_size:
        raise ValueError(f"vocab_size_per_layer_input={cfg.vocab_size_per_layer_input} is smaller "
                         f"than vocab_size={cfg.vocab_size}: some tokens would have no per-layer "
                         "embedding")
    kv_sources(cfg)
