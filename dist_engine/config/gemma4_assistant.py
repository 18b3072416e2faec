"""Gemma 4 assistant drafters (transformers' ``gemma4_assistant``): their config.json read into a
typed config, and checked against the target model they draft for.

An assistant is a small Gemma 4 decoder whose layers all read K/V instead of computing it: each
layer attends the target's K/V of the last target layer of its own type that stores K/V (the
last full and the last sliding layer before any KV-shared ones). Its input is
``pre_projection(cat[target embedding of the last token, target hidden state])``; its output feeds
the next draft step through ``post_projection`` and proposes through its own head (tied to its
embedding) or, with ``use_ordered_embeddings``, through a centroid-masked head that scores only
the tokens of the ``centroid_intermediate_top_k`` best of ``num_centroids`` token clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dist_engine.config.gemma4 import FULL, SLIDING
from dist_engine.config.model import ModelConfig, read_config_json

MODEL_TYPE = "gemma4_assistant"


@dataclass(frozen=True)
class Gemma4AssistantConfig:
    text: ModelConfig  # the drafter's decoder (its layers' sources are the target's, not its own)
    backbone_hidden_size: int  # the target's hidden size
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32

    def __post_init__(self) -> None:
        t = self.text
        if t.hidden_size_per_layer_input or t.n_routed_experts or t.use_double_wide_mlp:
            raise ValueError("a Gemma 4 assistant has no per-layer inputs, MoE block or double-wide "
                             "MLPs; this config asks for one")
        if self.use_ordered_embeddings:
            if not 0 < self.centroid_intermediate_top_k <= self.num_centroids:
                raise ValueError(f"centroid_intermediate_top_k={self.centroid_intermediate_top_k} must "
                                 f"be in 1..num_centroids={self.num_centroids}")
            if t.vocab_size % self.num_centroids:
                raise ValueError(f"vocab_size={t.vocab_size} must split evenly into "
                                 f"num_centroids={self.num_centroids} clusters")

    @classmethod
    def from_pretrained(cls, path: str) -> Gemma4AssistantConfig:
        return cls.from_dict(read_config_json(path, "a Gemma 4 assistant checkpoint folder"), path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "<dict>") -> Gemma4AssistantConfig:
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path} is not a Gemma 4 assistant (model_type "
                             f"{raw.get('model_type')!r}, expected {MODEL_TYPE!r})")
        if not isinstance(raw.get("text_config"), dict):
            raise ValueError(f"{path}/config.json has no text_config object")
        text = dict(raw["text_config"])
        # every layer reads the target's K/V: none of its own to share among its layers
        text.update(architectures=["Gemma4ForCausalLM"], num_kv_shared_layers=0,
                    hidden_size_per_layer_input=text.get("hidden_size_per_layer_input") or 0)
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", True))
        return cls(text=ModelConfig.from_dict(text, path),
                   backbone_hidden_size=int(raw.get("backbone_hidden_size", 1536)),
                   use_ordered_embeddings=bool(raw.get("use_ordered_embeddings", False)),
                   num_centroids=int(raw.get("num_centroids", 2048)),
                   centroid_intermediate_top_k=int(raw.get("centroid_intermediate_top_k", 32)))


def source_layers(target: ModelConfig) -> dict[str, int]:
    """Per layer type: the target layer whose K/V the assistant's layers of that type read (the
    last one of the type that stores its own K/V)."""
    from dist_engine.config.gemma4 import kv_sources

    stores = [i for i, src in enumerate(kv_sources(target)) if src is None]
    return {t: max(i for i in stores if target.layer_types[i] == t)
            for t in (SLIDING, FULL) if any(target.layer_types[i] == t for i in stores)}


def check_against(a: Gemma4AssistantConfig, target: ModelConfig) -> dict[str, int]:
    """ValueError unless ``a`` can draft for ``target``; returns ``source_layers(target)``."""
    if not target.is_gemma4:
        raise ValueError(f"a Gemma 4 assistant drafts for Gemma 4 models only, not {target.architecture}")
    if a.backbone_hidden_size != target.hidden_size:
        raise ValueError(f"the assistant was trained on a target of hidden size {a.backbone_hidden_size}; "
                         f"this model's is {target.hidden_size}")
    if a.text.vocab_size != target.vocab_size:
        raise ValueError(f"the assistant's vocabulary ({a.text.vocab_size}) differs from the model's "
                         f"({target.vocab_size})")
    sources = source_layers(target)
    for i, t in enumerate(a.text.layer_types):
        if t not in sources:
            raise ValueError(f"assistant layer {i} is {t}, but the model has no such layer to read K/V from")
        src = sources[t]
        if (a.text.head_dim_of(i), a.text.kv_heads_of(i)) != (target.head_dim_of(src), target.kv_heads_of(src)):
            raise ValueError(f"assistant layer {i} ({t}) expects K/V of head dim {a.text.head_dim_of(i)} "
                             f"with {a.text.kv_heads_of(i)} heads; target layer {src} stores "
                             f"{target.head_dim_of(src)} with {target.kv_heads_of(src)}")
    return sources
