"""The whole engine's configuration, checked across its parts (``EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_engine.config.model import DTYPES, ModelConfig
from dist_engine.config.runtime import (
    CacheConfig,
    ExpertCacheConfig,
    ParallelConfig,
    SchedulerConfig,
)
from dist_engine.config.speculative import SpeculativeConfig


def decode_graphs_apply(model: ModelConfig, tp: int, cp: int, dcp: int) -> bool:
    """Whether this model's decode steps on this layout can be replayed as CUDA graphs
    (speculation aside): one rank (no collectives in the graph), no MLA, no MoE routing
    (data-dependent shapes), no recurrent layers (their per-sequence state steps are not
    recorded)."""
    return (tp == cp == dcp == 1 and not model.is_mla and not model.is_hybrid
            and not any(model.is_moe_layer(i) for i in range(model.num_hidden_layers)))


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
    # CUDA: run decode steps eagerly instead of replaying CUDA graphs (worker/cuda_graph.py)
    enforce_eager: bool = False
    # routed experts paged under a per-rank budget instead of all loaded (dist_engine/experts/)
    experts: ExpertCacheConfig | None = None
    # quantize the (float) checkpoint's product weights at load: "int8" | "int4" (quant/)
    quantization: str | None = None
    # CPU products against quantized weights quantize activations to int8 (VNNI)
    int8_activations: bool = False
    # decoder layers whose outputs are appended to the final-norm hidden states that requests
    # with ``return_hidden_states`` get back (worker/layer_taps.py; DFlash training data)
    hidden_state_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization is not None:
            from dist_engine.quant import ON_LOAD_METHODS

            if self.quantization not in ON_LOAD_METHODS:
                raise ValueError(f"quantization at load must be one of {ON_LOAD_METHODS}, got "
                                 f"{self.quantization!r}")
            if self.model.quantization is not None or self.model.fp8_block is not None:
                raise ValueError(f"{self.model.path} is already quantized; it cannot be quantized "
                                 f"again to {self.quantization}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        m, tp = self.model, self.parallel.tensor_parallel_size
        for kv, layers in m.kv_head_counts.items():  # Gemma 4: per layer type
            if tp > kv and tp % kv:
                where = (f"num_key_value_heads={kv}" if len(m.kv_head_counts) == 1
                         else f"the {kv} KV heads of {layers} (of {m.num_attention_heads} query heads)")
                raise ValueError(
                    f"tensor_parallel_size={tp} exceeds {where} and is not a multiple of them, so KV "
                    f"heads cannot be replicated evenly; use TP <= {min(m.kv_head_counts)} or a "
                    f"multiple of {' and '.join(map(str, sorted(m.kv_head_counts)))}"
                )
        bad = [i for i in self.hidden_state_layers if not 0 <= i < m.num_hidden_layers]
        if bad:
            raise ValueError(f"hidden_state_layers {bad} are not layers of {m.architecture} "
                             f"(0..{m.num_hidden_layers - 1})")
        if self.hidden_state_layers and self.parallel.context_parallel_size > 1:
            raise ValueError("hidden_state_layers cannot be returned with context parallelism (--cp)")
        dcp = self.parallel.decode_context_parallel_size
        if dcp > 1:
            if len(m.kv_head_counts) > 1:
                raise ValueError(
                    f"decode_context_parallel_size={dcp} needs one KV-head count in every layer, but "
                    f"{m.architecture} has {sorted(m.kv_head_counts)}; use --cp for sequence shards")
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
        if "linear_attention" in m.layer_types and tp > m.linear_num_key_heads:
            raise ValueError(
                f"tensor_parallel_size={tp} exceeds linear_num_key_heads={m.linear_num_key_heads}: "
                f"Gated DeltaNet layers go to ranks by whole key heads (each with its "
                f"{m.linear_num_value_heads // m.linear_num_key_heads} value heads); use TP <= "
                f"{m.linear_num_key_heads}"
            )
        if tp > m.num_attention_heads:
            raise ValueError(
                f"tensor_parallel_size={tp} exceeds num_attention_heads={m.num_attention_heads}: "
                "some ranks would hold no attention head"
            )
        if m.is_v4:
            _check_v4(self)
        spec = self.speculative
        if spec is not None:
            if spec.model is None and m.num_mtp_layers == 0:
                raise ValueError(
                    f"{m.path} has no MTP layer (its config announces none): graft one with "
                    "`dist-engine graft-mtp` and pass its folder as the speculative model"
                )
            if self.scheduler.num_lookahead_slots < spec.num_lookahead_slots:
                raise ValueError(
                    f"speculation with K={spec.num_speculative_tokens} needs "
                    f"num_lookahead_slots >= {spec.num_lookahead_slots}"
                )
        row = m.kv_lora_rank + m.qk_rope_head_dim if m.is_mla else m.head_dim  # one cached row
        if self.cache.kv_cache_dtype.startswith("turboquant") and row % 8:
            raise ValueError(
                f"kv_cache_dtype={self.cache.kv_cache_dtype} packs codes in groups of 8, but this "
                f"model caches rows of {row} values; use fp8_e4m3 or auto")
        if self.experts is not None and not any(m.is_moe_layer(i) for i in range(m.num_hidden_layers)):
            raise ValueError(f"expert_cache_memory is set, but {m.architecture} at {m.path} has no routed "
                             "experts to page; leave it unset for dense models")
        if self.experts is not None and m.quantization is not None and m.quantization.method == "gguf":
            raise ValueError(
                f"expert_cache_memory: {m.path} is a GGUF file, and the expert cache pages routed "
                "experts from safetensors checkpoints only (it reads one expert's byte ranges from "
                "their headers); serve it without --expert-cache-memory, or page a safetensors "
                "checkpoint (float, FP8, GPTQ, AWQ, compressed-tensors, ModelOpt)")
        if self.scheduler.max_model_len > m.max_position_embeddings and not m.rope_scaling:
            raise ValueError(
                f"max_model_len={self.scheduler.max_model_len} exceeds the model's "
                f"max_position_embeddings={m.max_position_embeddings}; lower --max-model-len"
            )


def _check_v4(config: EngineConfig) -> None:
    """DeepSeek-V4 on this layout: blocks hold whole compressed rows, ranks whole head groups
    of the grouped output projection."""
    m, tp, bs = config.model, config.parallel.tensor_parallel_size, config.cache.block_size
    if bs % m.min_block_size:
        raise ValueError(f"block_size={bs} must be a multiple of every compression ratio "
                         f"{m.v4.ratios} (a block holds whole compressed rows); use --block-size "
                         f"{max(bs, m.min_block_size)} or leave it unset")
    if m.v4.o_groups % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide o_groups={m.v4.o_groups}: each "
                         "rank projects whole head groups of the grouped output projection")
    spec = config.speculative
    if spec is not None and spec.model is None and (spec.hidden_stage, spec.feedback) != ("raw", "raw"):
        raise ValueError("DeepSeek-V4's MTP layer reads the hyper-connection streams: speculation needs "
                         "hidden_stage='raw' and feedback='raw' (the defaults for its native MTP)")
    if config.cache.kv_cache_dtype not in ("auto", config.dtype):
        raise ValueError(f"kv_cache_dtype={config.cache.kv_cache_dtype!r} is not supported for "
                         "DeepSeek-V4 yet (its window, compressed rows and indexer keys are kept in "
                         "the model dtype); use 'auto'")
