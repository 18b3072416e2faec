"""A checkpoint's architecture, read from its config.json (``ModelConfig``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from dist_engine.config import gemma4, qwen3_5
from dist_engine.config.deepseek_v4 import V4_ARCHITECTURES, V4Config, v4_fields

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "DeepseekV3ForCausalLM",
    "Qwen3MoeForCausalLM",
    *gemma4.GEMMA4_ARCHITECTURES,
    *V4_ARCHITECTURES,
    *qwen3_5.QWEN3_5_ARCHITECTURES,
)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture hyper-parameters of a checkpoint, read from its config.json."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on per-head q and k (Qwen3)
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of HF's dict
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # MTP layers shipped at model.layers.{num_hidden_layers + j} (DeepSeek-V3 / GLM-4.5 style)
    num_nextn_predict_layers: int = 0
    # Multi-head latent attention (DeepSeek-V3): set when kv_lora_rank is. The cache holds one
    # latent "head" of kv_lora_rank + qk_rope_head_dim per token (num_key_value_heads is 1).
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # Mixture of experts (DeepSeek-V3): layers from first_k_dense_replace on route each token to
    # num_experts_per_tok of n_routed_experts (sigmoid scores, grouped top-k) plus shared experts.
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    moe_scoring: str = "sigmoid"  # DeepSeek-V3; "softmax": Qwen3-MoE
    decoder_sparse_step: int = 1  # Qwen3-MoE: every this-many-th layer is MoE...
    mlp_only_layers: tuple[int, ...] = ()  # ...except these
    # FP8 block-scaled weights of DeepSeek-V3 (quantization_config quant_method "fp8" with
    # weight_block_size, layers/fp8.py): tile rows x cols
    fp8_block: tuple[int, int] | None = None
    # DeepSeek-V4 (config/deepseek_v4.py): layer types, compression, indexer, hyper-connections
    v4: V4Config | None = None
    # Each layer's type (empty: every layer attends alike). Gemma 4 (config/gemma4.py):
    # "sliding_attention" / "full_attention", with each layer's head dim and KV-head count
    # (empty: head_dim and num_key_value_heads everywhere) and the RoPE of each layer type:
    # (type, theta, sorted scaling items or None)
    layer_types: tuple[str, ...] = ()
    layer_head_dims: tuple[int, ...] = ()
    layer_kv_heads: tuple[int, ...] = ()
    rope_by_layer_type: tuple[tuple[str, float, tuple[tuple[str, Any], ...] | None], ...] = ()
    attention_k_eq_v: bool = False  # Gemma 4 global layers: V from k_proj, no v_proj
    num_kv_shared_layers: int = 0  # the last this-many layers read an earlier layer's K/V
    hidden_size_per_layer_input: int = 0  # per-layer embeddings (Gemma 4's E models)
    vocab_size_per_layer_input: int = 0
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    use_double_wide_mlp: bool = False  # Gemma 4: KV-shared layers' MLPs are twice as wide
    # conditional-generation checkpoints: text weights under model.language_model.*, these
    # towers' weights skipped at load
    multimodal_towers: tuple[str, ...] = ()
    # Hybrid models (Qwen3.5, config/qwen3_5.py): layer_types names each layer's token mixer,
    # "full_attention" or "linear_attention" (Gated DeltaNet with linear_* heads).
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    partial_rotary_factor: float = 1.0  # rotary on the first head_dim * this dims of each head
    # MTP layers shipped as mtp.layers.{j} with mtp.fc / mtp.pre_fc_norm_* / mtp.norm (Qwen3.5)
    mtp_num_hidden_layers: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen3.5-MoE: one sigmoid-gated shared expert
    multimodal: bool = False  # text weights under model.language_model.*; vision tower skipped
    # any other quantized checkpoint: the method's typed config (quant/, e.g. gptq.Config);
    # its weights are kept quantized
    quantization: Any = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_gemma4(self) -> bool:
        return self.architecture in gemma4.GEMMA4_ARCHITECTURES

    def head_dim_of(self, layer: int) -> int:
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def kv_heads_of(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_key_value_heads

    @property
    def kv_head_counts(self) -> dict[int, str]:
        """Each distinct KV-head count -> the layers that have it (for error messages)."""
        if not self.layer_kv_heads:
            return {self.num_key_value_heads: "every layer"}
        out: dict[int, str] = {}
        for n in sorted(set(self.layer_kv_heads), reverse=True):
            types = sorted({t for t, k in zip(self.layer_types, self.layer_kv_heads) if k == n})
            out[n] = "the " + " and ".join(types) + " layers"
        return out

    @property
    def is_v4(self) -> bool:
        return self.v4 is not None

    @property
    def min_block_size(self) -> int:
        """The smallest KV block that holds whole rows of every compressed layer (1: any)."""
        return max(self.v4.ratios, default=1) if self.v4 is not None else 1

    @property
    def native_mtp_settings(self) -> dict[str, str]:
        """Speculation settings the model's own MTP layers need (DeepSeek-V4's reads the
        hyper-connection streams before the final collapse, and feeds its own back)."""
        return {"hidden_stage": "raw", "feedback": "raw"} if self.is_v4 else {}

    @property
    def is_hybrid(self) -> bool:
        """Qwen3.5 family: Gated DeltaNet and gated attention layers as ``layer_types`` says."""
        return self.architecture in qwen3_5.QWEN3_5_ARCHITECTURES

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_mtp_layers(self) -> int:
        """MTP layers the checkpoint announces, whichever naming it uses."""
        return self.mtp_num_hidden_layers if self.is_hybrid else self.num_nextn_predict_layers

    @property
    def mtp_prefixes(self) -> tuple[str, ...]:
        """Checkpoint-name prefixes of the MTP layers (not the main model's tensors)."""
        if self.is_hybrid:
            return ("mtp.",) if self.mtp_num_hidden_layers else ()
        if self.is_v4:
            return ("mtp.",) if self.num_nextn_predict_layers else ()
        return tuple(f"model.layers.{self.num_hidden_layers + j}." for j in range(self.num_nextn_predict_layers))

    def is_moe_layer(self, layer: int) -> bool:
        if not self.n_routed_experts or layer in self.mlp_only_layers:
            return False
        if self.moe_scoring == "softmax":
            return (layer + 1) % self.decoder_sparse_step == 0
        return layer >= self.first_k_dense_replace

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} in {self.path}/config.json is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.fp8_block is not None and not (self.is_mla or self.is_v4):
            raise ValueError(f"FP8 block-scaled checkpoints are supported for DeepSeek-V3 and V4 only, "
                             f"not {self.architecture}; use a bf16/fp32 checkpoint")
        if self.is_v4 and self.quantization is not None:
            raise ValueError(f"DeepSeek-V4 checkpoints are read as DeepSeek ships them (FP8 with "
                             f"weight_block_size, MXFP4 experts); quantization method "
                             f"{self.quantization.method!r} is not supported for them")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"n_routed_experts={self.n_routed_experts} must split into n_group="
                                 f"{self.n_group} groups and 0 < topk_group={self.topk_group} <= n_group")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                 f"[1, n_routed_experts={self.n_routed_experts}]")
            per_group = self.n_routed_experts // self.n_group
            if self.moe_scoring == "sigmoid" and per_group < 2:
                raise ValueError(f"grouped routing scores each group by its two best experts, but "
                                 f"n_group={self.n_group} leaves {per_group} expert per group")
            if self.moe_scoring == "sigmoid" and self.topk_group * per_group < self.num_experts_per_tok:
                raise ValueError(f"topk_group={self.topk_group} groups of {per_group} experts cannot "
                                 f"supply num_experts_per_tok={self.num_experts_per_tok}")
        if self.is_gemma4:
            gemma4.check(self)
        elif self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; only 'silu'")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.is_hybrid:
            qwen3_5.check_hybrid(self)
        elif not self.is_gemma4 and self.layer_types and set(self.layer_types) != {"full_attention"}:
            raise ValueError(f"{self.architecture} has only full-attention layers; layer_types "
                             f"{sorted(set(self.layer_types))} needs a hybrid architecture")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_pretrained(cls, path: str) -> ModelConfig:
        return cls.from_dict(read_config_json(path, "an HF-format model folder or a known name"), path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "<dict>") -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError(f"{path}/config.json lists no 'architectures'")
        arch = archs[0]
        if arch in gemma4.GEMMA4_ARCHITECTURES:
            raw = gemma4.text_config(raw)
        if arch in qwen3_5.QWEN3_5_ARCHITECTURES:
            raw = qwen3_5.text_config(raw)
        n_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        # transformers 5 moved rope settings into "rope_parameters"; older files keep them flat.
        rope = dict(raw.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or rope
        if arch in qwen3_5.QWEN3_5_ARCHITECTURES:
            scaling = qwen3_5.rope_scaling(scaling)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        sliding = raw.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding = None  # Qwen2 configs carry a window they do not use unless asked to
        if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM") and not raw.get("use_sliding_window"):
            sliding = None
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        quant = raw.get("quantization_config")
        fp8_block = quantization = None
        if quant and quant.get("quant_method") == "fp8" and quant.get("weight_block_size") and (
                raw.get("kv_lora_rank") or arch in V4_ARCHITECTURES):
            fp8_block = tuple(quant["weight_block_size"])
        elif quant:
            from dist_engine.quant import parse_config

            quantization = parse_config(quant, path)
        family = {}  # architecture-specific fields (MLA/MoE/hybrid)
        if arch in gemma4.GEMMA4_ARCHITECTURES:
            family = gemma4.gemma4_fields(raw)
        if raw.get("kv_lora_rank"):
            if raw.get("scoring_func", "sigmoid") != "sigmoid" or raw.get("topk_method", "noaux_tc") != "noaux_tc":
                raise ValueError("only DeepSeek-V3 routing (sigmoid scores, noaux_tc grouped top-k) is supported")
            family = dict(
                q_lora_rank=raw.get("q_lora_rank"), kv_lora_rank=raw["kv_lora_rank"],
                qk_nope_head_dim=raw["qk_nope_head_dim"], qk_rope_head_dim=raw["qk_rope_head_dim"],
                v_head_dim=raw["v_head_dim"], rope_interleave=raw.get("rope_interleave", True),
                n_routed_experts=raw.get("n_routed_experts") or raw.get("num_local_experts") or 0,
                num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
                n_shared_experts=raw.get("n_shared_experts") or 0,
                moe_intermediate_size=raw.get("moe_intermediate_size") or 0,
                n_group=raw.get("n_group") or 1, topk_group=raw.get("topk_group") or 1,
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
                norm_topk_prob=raw.get("norm_topk_prob", True),
                first_k_dense_replace=raw.get("first_k_dense_replace", 0),
                # the cache's one latent head; RoPE runs over the rope part of q/k only
                num_key_value_heads=1, head_dim=raw["qk_rope_head_dim"])
        if arch == "Qwen3MoeForCausalLM":
            family = dict(n_routed_experts=raw.get("num_experts") or raw["num_local_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
                       moe_intermediate_size=raw["moe_intermediate_size"],
                       norm_topk_prob=raw.get("norm_topk_prob", False), moe_scoring="softmax",
                       decoder_sparse_step=raw.get("decoder_sparse_step", 1),
                       mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
                       num_key_value_heads=raw.get("num_key_value_heads") or n_heads,
                       head_dim=raw.get("head_dim") or hidden // n_heads)
        if arch in qwen3_5.QWEN3_5_ARCHITECTURES:
            family = qwen3_5.hybrid_fields(raw)
        if arch in V4_ARCHITECTURES:
            family = v4_fields(raw, path)
        inter = family.pop("intermediate_size", None) or raw["intermediate_size"]
        qk_norm = family.pop("qk_norm", arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"))
        fields = dict(
            path=path,
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=raw.get("num_key_value_heads") or n_heads,
            head_dim=raw.get("head_dim") or hidden // n_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", arch == "Qwen2ForCausalLM"),
            qk_norm=qk_norm,
            sliding_window=sliding,
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            hidden_act=raw.get("hidden_act", "silu"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            num_nextn_predict_layers=raw.get("num_nextn_predict_layers") or 0,
            fp8_block=fp8_block,
            quantization=quantization,
        )
        fields.update(family)  # architecture-specific values win over the generic reading
        return cls(**fields)


def read_config_json(path: str, what: str) -> dict[str, Any]:
    """``path/config.json`` as a dict; a folder without one is a ValueError asking for ``what``."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"{path} has no config.json: pass {what}")
    with open(cfg_file) as f:
        return json.load(f)
