"""Frozen, validated configuration objects.

Every config checks itself in ``__post_init__`` and raises ``ValueError`` with a message that says
what to change. Configs cross process boundaries (they are pickled to Ray actors), so they hold
only plain data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "DeepseekV3ForCausalLM",
    "Qwen3MoeForCausalLM",
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
    # FP8 block-scaled weights (quantization_config quant_method "fp8"): tile rows x cols
    fp8_block: tuple[int, int] | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

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
        if self.fp8_block is not None and not self.is_mla:
            raise ValueError(f"FP8 block-scaled checkpoints are supported for DeepseekV3ForCausalLM only, "
                             f"not {self.architecture}; use a bf16/fp32 checkpoint")
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
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; only 'silu'")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_pretrained(cls, path: str) -> ModelConfig:
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ValueError(f"{path} has no config.json: pass an HF-format model folder or a known name")
        with open(cfg_file) as f:
            return cls.from_dict(json.load(f), path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "<dict>") -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError(f"{path}/config.json lists no 'architectures'")
        arch = archs[0]
        n_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        # transformers 5 moved rope settings into "rope_parameters"; older files keep them flat.
        rope = dict(raw.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or rope
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
        fp8_block = None
        if quant:
            if quant.get("quant_method") != "fp8" or not quant.get("weight_block_size"):
                raise ValueError(f"{path}/config.json: quantization_config {quant.get('quant_method')!r} "
                                 "is not supported (only FP8 with weight_block_size, as DeepSeek ships)")
            fp8_block = tuple(quant["weight_block_size"])
        family = {}  # architecture-specific fields (MLA/MoE)
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
        return cls(
            path=path,
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=n_heads,
            **({} if family else dict(num_key_value_heads=raw.get("num_key_value_heads") or n_heads,
                                   head_dim=raw.get("head_dim") or hidden // n_heads)),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", arch == "Qwen2ForCausalLM"),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            sliding_window=sliding,
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            hidden_act=raw.get("hidden_act", "silu"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            num_nextn_predict_layers=raw.get("num_nextn_predict_layers") or 0,
            fp8_block=fp8_block,
            **family,
        )


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are laid out: world = TP x CP ranks, rank = cp_rank * TP + tp_rank.

    Context parallelism (CP) gives every sequence's KV cache to CP shards (blocks striped over
    them); each CP rank holds the TP shard of the weights and attends over its own blocks, and
    partial attentions are merged by log-sum-exp, so the longest context grows with CP.
    """

    tensor_parallel_size: int = 1
    context_parallel_size: int = 1
    # Decode context parallelism: inside each TP group, DCP consecutive ranks that would hold
    # the same (replicated) KV heads hold disjoint blocks of the sequence instead; no extra ranks.
    decode_context_parallel_size: int = 1
    # "auto": in-process when world_size == 1, Ray otherwise. "ray" forces Ray even for one rank.
    executor: str = "auto"
    ray_address: str | None = None  # join an existing Ray cluster; None starts a local one
    # how ranks are placed on Ray nodes: PACK (fill a node first), SPREAD, STRICT_SPREAD (one
    # rank per node, e.g. to use one GPU on each of several machines)
    placement_strategy: str = "PACK"
    placement_timeout_s: float = 60.0
    collective_timeout_s: float = 60.0
    # CPU ranks on one host exchange through shared memory instead of gloo (much faster).
    shm_allreduce: bool = True

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.context_parallel_size < 1:
            raise ValueError(f"context_parallel_size must be >= 1, got {self.context_parallel_size}")
        dcp, tp = self.decode_context_parallel_size, self.tensor_parallel_size
        if dcp < 1 or tp % dcp:
            raise ValueError(f"decode_context_parallel_size={dcp} must be >= 1 and divide "
                             f"tensor_parallel_size={tp} (its ranks are part of the TP group)")
        if self.executor not in ("auto", "inprocess", "ray"):
            raise ValueError(f"executor must be 'auto', 'inprocess' or 'ray', got {self.executor!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")
        if self.executor == "inprocess" and self.world_size > 1:
            raise ValueError("the in-process executor runs one rank; use executor='ray' for TP or CP > 1")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.context_parallel_size

    @property
    def num_kv_shards(self) -> int:
        """Sequence shards of the KV cache: logical block b lives on shard b mod this."""
        return self.context_parallel_size * self.decode_context_parallel_size

    @property
    def use_ray(self) -> bool:
        return self.executor == "ray" or (self.executor == "auto" and self.world_size > 1)


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16
    # Exactly this many blocks per rank (tests); otherwise sized from kv_cache_memory or
    # memory_fraction. With context parallelism the whole cache holds CP times as many.
    num_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes per rank
    memory_fraction: float = 0.5  # of the memory left after weights and peak activations
    enable_prefix_caching: bool = True
    # storage of K/V: "auto" (the model dtype), a float dtype, or "fp8_e4m3" (one byte per
    # element with per-layer scales calibrated at start-up; half the bytes of bfloat16)
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    # KV slots reserved past the last token of a sequence that samples this step, for the
    # draft tokens speculative decoding writes and verifies in the same step.
    num_lookahead_slots: int = 0

    def __post_init__(self) -> None:
        if self.num_lookahead_slots < 0:
            raise ValueError(f"num_lookahead_slots must be >= 0, got {self.num_lookahead_slots}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


CONCAT_ORDERS = ("emb_hidden", "hidden_emb")
STAGES = ("normed", "raw")
DRAFT_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class SpeculativeConfig:
    """MTP self-speculative decoding.

    ``model``: a folder holding a grafted MTP layer (``mtp_config.json`` + ``mtp.safetensors``,
    written by ``dist-engine graft-mtp``); None uses the checkpoint's own MTP layers. The three
    per-model settings: ``concat_order`` of ``eh_proj``'s input (DeepSeek/GLM put the embedding
    first, MiMo the hidden state), ``hidden_stage`` of the main model's hidden state that feeds
    the first draft step (after or before the final norm), and ``feedback``: what a chained
    step feeds the next (the MTP block's output after ``shared_head.norm``, or before).
    """

    method: str = "mtp"
    num_speculative_tokens: int = 1
    model: str | None = None
    concat_order: str = "emb_hidden"
    hidden_stage: str = "normed"
    feedback: str = "normed"
    # Draft over only the first ``draft_vocab_size`` ids of the graft's frequency-ranked list
    # (verification stays full-vocabulary). None: the graft's whole list, or the full vocabulary.
    draft_vocab_size: int | None = None
    # Weights of the draft path: the reduced draft head, and on CPU (the product kernel) the
    # MTP layer's linear weights; "auto" is 16-bit (the model's dtype when it is 16-bit, else
    # bfloat16). Activations stay in the model's dtype. It halves what drafting streams and
    # only changes which token is drafted in a near-tie (verification is the model's own).
    draft_dtype: str = "auto"
    # Lower K when a step would carry more draft tokens than this (the batch is then compute
    # bound and drafts cost more than they save); 0: never lower it.
    max_draft_tokens_per_step: int = 8
    # Draft position j only while the recent share of steps accepting it (all drafts before it
    # accepted too) is at least this: the j-th draft adds that many tokens per step and costs a
    # chained MTP step plus a verified row (~5-10% of a step on CPU). 0: always draft K.
    min_draft_acceptance: float = 0.1
    # A sequence admitted while more than this many sequences are in the engine (running and
    # waiting, itself included) runs without speculation for its whole life: no drafts, and the
    # MTP layer skips it (its cache is kept only for sequences that may draft). None: the batch
    # size from which ``max_draft_tokens_per_step`` leaves no draft at all; 0: never.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method != "mtp":
            raise ValueError(f"speculative method {self.method!r} is not supported; use 'mtp'")
        if not 1 <= self.num_speculative_tokens <= 8:
            raise ValueError(f"num_speculative_tokens must be in 1..8, got {self.num_speculative_tokens}")
        if self.concat_order not in CONCAT_ORDERS:
            raise ValueError(f"concat_order must be one of {CONCAT_ORDERS}, got {self.concat_order!r}")
        for name in ("hidden_stage", "feedback"):
            if getattr(self, name) not in STAGES:
                raise ValueError(f"{name} must be one of {STAGES}, got {getattr(self, name)!r}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")
        if self.draft_dtype not in DRAFT_DTYPES:
            raise ValueError(f"draft_dtype must be one of {DRAFT_DTYPES}, got {self.draft_dtype!r}")
        if self.max_draft_tokens_per_step < 0:
            raise ValueError("max_draft_tokens_per_step must be >= 0")
        if not 0.0 <= self.min_draft_acceptance < 1.0:
            raise ValueError(f"min_draft_acceptance must be in [0, 1), got {self.min_draft_acceptance}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 0:
            raise ValueError(f"disable_by_batch_size must be >= 0 (0: never), got {self.disable_by_batch_size}")

    @property
    def speculate_up_to(self) -> int:
        """Sequences in the engine up to which a new one speculates (0: any number)."""
        if self.disable_by_batch_size is not None:
            return self.disable_by_batch_size
        return self.max_draft_tokens_per_step

    @property
    def num_lookahead_slots(self) -> int:
        """Slots past the sequence a step may write: K drafts verified, K-1 chained MTP slots."""
        return 2 * self.num_speculative_tokens - 1


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    # Threads per rank for CPU matmuls; None: the cores divided among the local ranks.
    cpu_threads: int | None = None
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        m, tp = self.model, self.parallel.tensor_parallel_size
        if tp > m.num_key_value_heads and tp % m.num_key_value_heads:
            raise ValueError(
                f"tensor_parallel_size={tp} exceeds num_key_value_heads={m.num_key_value_heads} and is "
                f"not a multiple of it, so KV heads cannot be replicated evenly; use TP <= "
                f"{m.num_key_value_heads} or a multiple of it"
            )
        dcp = self.parallel.decode_context_parallel_size
        if dcp > 1:
            replicas = tp // m.num_key_value_heads if tp > m.num_key_value_heads else 1
            if replicas % dcp:
                raise ValueError(
                    f"decode_context_parallel_size={dcp} needs KV heads replicated a multiple of {dcp} "
                    f"times, but TP={tp} over {m.num_key_value_heads} KV heads replicates them "
                    f"{replicas}x; use --dcp dividing {replicas} (or --cp for more sequence shards)")
            if (m.num_attention_heads // m.num_key_value_heads) % replicas:
                raise ValueError(
                    f"decode_context_parallel_size needs the {m.num_attention_heads // m.num_key_value_heads} "
                    f"query heads per KV head to split evenly over its {replicas} replicas (TP={tp})")
        if tp > m.num_attention_heads:
            raise ValueError(
                f"tensor_parallel_size={tp} exceeds num_attention_heads={m.num_attention_heads}: "
                "some ranks would hold no attention head"
            )
        spec = self.speculative
        if spec is not None:
            if spec.model is None and m.num_nextn_predict_layers == 0:
                raise ValueError(
                    f"{m.path} has no MTP layer (num_nextn_predict_layers is 0): graft one with "
                    "`dist-engine graft-mtp` and pass its folder as the speculative model"
                )
            if self.scheduler.num_lookahead_slots < spec.num_lookahead_slots:
                raise ValueError(
                    f"speculation with K={spec.num_speculative_tokens} needs "
                    f"num_lookahead_slots >= {spec.num_lookahead_slots}"
                )
        if self.scheduler.max_model_len > m.max_position_embeddings and not m.rope_scaling:
            raise ValueError(
                f"max_model_len={self.scheduler.max_model_len} exceeds the model's "
                f"max_position_embeddings={m.max_position_embeddings}; lower --max-model-len"
            )
