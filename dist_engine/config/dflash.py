"""DFlash block-diffusion drafters (z-lab's published format): config.json read into a typed
config and checked against the target model.

A drafter checkpoint is a small Qwen3-style decoder (``architectures: ["DFlashDraftModel"]``)
whose settings name ``block_size`` (tokens per proposal block: the last verified token, then
``block_size - 1`` masks), ``target_layer_ids`` (the target layers whose outputs are
concatenated as the drafter's context features) and ``mask_token_id``, in a ``dflash_config``
object or at the top level (the object wins). It has no embedding or head of its own: the
target's embedding feeds the block (raw rows times ``input_embedding_scale``) and the target's
output head turns the drafter's states into logits (times ``output_multiplier``, soft-capped if
the drafter's config says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dist_engine.config.model import ModelConfig, read_config_json

ARCHITECTURE = "DFlashDraftModel"


@dataclass(frozen=True)
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    input_embedding_scale: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcapping: float | None = None
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"DFlash block_size must be >= 2 (one known token and a mask), got {self.block_size}")
        if not self.target_layer_ids:
            raise ValueError("DFlash target_layer_ids must name at least one target layer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_pretrained(cls, path: str) -> DFlashConfig:
        return cls.from_dict(read_config_json(path, "a DFlash drafter checkpoint folder"), path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "<dict>") -> DFlashConfig:
        if ARCHITECTURE not in (raw.get("architectures") or []):
            raise ValueError(f"{path} is not a DFlash drafter (architectures {raw.get('architectures')}, "
                             f"expected {ARCHITECTURE})")
        d = {**raw, **(raw.get("dflash_config") or {})}
        for extra in ("conv_kernel_size", "selector_rank"):
            if d.get(extra):
                raise ValueError(f"{path}: a DFlash-2 drafter ({extra}: convolutions / candidate "
                                 "selector) is not supported; only the published DFlash format")
        types = set(d.get("layer_types") or ["full_attention"])
        if types != {"full_attention"} or d.get("is_causal"):
            raise ValueError(f"{path}: only non-causal full-attention DFlash layers are supported, "
                             f"got layer_types {sorted(types)}")
        for key in ("target_layer_ids", "mask_token_id"):
            if d.get(key) is None:
                raise ValueError(f"{path}/config.json names no {key} (in dflash_config or at the top level)")
        rope = d.get("rope_parameters") or {}
        heads = d["num_attention_heads"]
        return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
                   num_key_value_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))),
                   block_size=int(d.get("block_size", 16)),
                   target_layer_ids=tuple(int(i) for i in d["target_layer_ids"]),
                   mask_token_id=int(d["mask_token_id"]),
                   input_embedding_scale=float(d.get("input_embedding_scale", 1.0)),
                   output_multiplier=float(d.get("output_multiplier", 1.0)),
                   final_logit_softcapping=d.get("final_logit_softcapping") or None,
                   attention_bias=bool(d.get("attention_bias", False)))

    def check_against(self, target: ModelConfig) -> None:
        if self.hidden_size != target.hidden_size:
            raise ValueError(f"the DFlash drafter's hidden size {self.hidden_size} differs from the model's "
                             f"{target.hidden_size} (it reads the model's embedding and head)")
        bad = [i for i in self.target_layer_ids if not 0 <= i < target.num_hidden_layers]
        if bad:
            raise ValueError(f"DFlash target_layer_ids {bad} are not layers of the model "
                             f"(0..{target.num_hidden_layers - 1})")
        if not 0 <= self.mask_token_id < target.vocab_size:
            raise ValueError(f"DFlash mask_token_id {self.mask_token_id} is outside the model's "
                             f"vocabulary of {target.vocab_size}")
