"""What a user sets to start an engine (``EngineArgs``): the one place that holds its defaults.

``LLM(**kwargs)``, ``AsyncLLM(**kwargs)``, ``dist-engine generate`` and ``dist-engine serve`` all
build an ``EngineArgs``; the CLI's flags, their defaults and help are generated from its fields
(``cli_flag`` metadata), and every default that a config dataclass also has is read from that
dataclass, so the two cannot drift. ``engine_config()`` resolves what depends on the checkpoint
(context length, speculation's ``auto``) into the frozen ``EngineConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from dist_engine.config.engine import EngineConfig, decode_graphs_apply
from dist_engine.config.model import DTYPES, ModelConfig
from dist_engine.config.runtime import (
    EXPERT_CACHE_POLICIES,
    KV_CACHE_DTYPES,
    CacheConfig,
    ExpertCacheConfig,
    ParallelConfig,
    SchedulerConfig,
)
from dist_engine.config.sizes import parse_size
from dist_engine.config.speculative import METHODS, MTP_ALIASES, SpeculativeConfig
from dist_engine.quant import ON_LOAD_METHODS, QUANTIZATION_CHOICES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SPECULATIVE_MODES = ("auto", "none", *METHODS, *MTP_ALIASES)
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# a CPU prefill chunk of 512 tokens takes ~1.5 s on the default model; GPUs take longer chunks
DEFAULT_BATCHED_TOKENS = {"cpu": 512, "cuda": 2048}
DEFAULT_MAX_MODEL_LEN = 8192  # cap on the model's own limit when --max-model-len is not given


def _arg(default: Any, flag: str | None = None, help: str = "", **cli: Any) -> Any:
    """A field with its CLI flag (None: Python API only), help text and argparse extras."""
    return field(default=default, metadata={"cli_flag": flag, "help": help, **cli})


@dataclass(frozen=True)
class EngineArgs:
    model: str = _arg(DEFAULT_MODEL, "--model", "a local HF-format folder or a known name")
    tensor_parallel_size: int = _arg(ParallelConfig.tensor_parallel_size, "--tp",
                                     "tensor-parallel ranks (Ray actors if > 1)")
    context_parallel_size: int = _arg(
        ParallelConfig.context_parallel_size, "--cp",
        "context-parallel ranks: each holds 1/CP of every sequence's KV cache (world = TP x CP)")
    decode_context_parallel_size: int = _arg(
        ParallelConfig.decode_context_parallel_size, "--dcp",
        "decode context parallel: inside the TP group, ranks that would duplicate the same KV "
        "heads hold disjoint parts of each sequence instead (divides TP / KV heads)")
    dtype: str = _arg(EngineConfig.dtype, "--dtype", "weights and activations", choices=DTYPES)
    quantization: str | None = _arg(
        None, "--quantization",
        "int8 | int4: quantize a float checkpoint's weights at load (groups of 32, fp16 scales; "
        "int4 with a min per group, as GGUF's Q4_1); a quantized checkpoint (GGUF, GPTQ, AWQ, "
        "compressed-tensors, FP8, ModelOpt, MXFP4) is read as it is, and naming another method "
        "is an error", choices=QUANTIZATION_CHOICES)
    int8_activations: bool = _arg(
        EngineConfig.int8_activations, "--int8-activations",
        "CPU products against 4/8-bit weights quantize each activation row to int8 per 32 "
        "inputs and use VNNI dot products (llama.cpp's arithmetic: faster, results differ slightly "
        "from the float product, and greedy output under speculation or prefix caching can part "
        "from plain decoding); needs an AVX-512 VNNI CPU")
    device: str = _arg(EngineConfig.device, "--device", "where the ranks compute",
                       choices=("cpu", "cuda"))
    max_model_len: int | None = _arg(
        None, "--max-model-len",
        f"context limit in tokens (default: the model's, at most {DEFAULT_MAX_MODEL_LEN})")
    block_size: int | None = _arg(
        None, "--block-size",
        f"tokens per KV block (default: {CacheConfig.block_size}, or the largest compression "
        "ratio of a DeepSeek-V4 model if that is more)")
    num_kv_blocks: int | None = _arg(None, help="exactly this many KV blocks per rank (tests)")
    kv_cache_memory: int | str | None = _arg(
        None, "--kv-cache-memory",
        "KV cache bytes per rank, e.g. 2GiB or 500MB (default: from --memory-fraction)")
    memory_fraction: float = _arg(
        CacheConfig.memory_fraction, "--memory-fraction",
        "share of the memory left after weights and activations given to the KV cache")
    enable_prefix_caching: bool = _arg(CacheConfig.enable_prefix_caching, "--no-prefix-caching",
                                       "do not reuse cached prompt blocks")
    kv_cache_dtype: str = _arg(
        CacheConfig.kv_cache_dtype, "--kv-cache-dtype",
        "K/V storage: auto (the model dtype), fp8_e4m3 (half the bytes of bfloat16, "
        "per-layer scales calibrated at start-up), turboquant4 / turboquant3 (4 / 3 bits per "
        "value: rotated, codebook-quantized rows with an fp16 scale; 3.8x / 4.9x fewer bytes "
        "than bfloat16 at head size 64)", choices=KV_CACHE_DTYPES)
    expert_cache_memory: int | str | None = _arg(
        None, "--expert-cache-memory",
        "MoE models: page routed experts under this budget per rank (e.g. 4GiB) instead of loading "
        "them all; they stay in the checkpoint files (CUDA: in pinned host memory) and a cache "
        "of this size holds the ones in use (default: all loaded)")
    expert_cache_policy: str = _arg("lfu", "--expert-cache-policy",
                                    "which cached expert to evict: lfu (least frequently used, "
                                    "older uses counting less) or lru", choices=EXPERT_CACHE_POLICIES)
    expert_prefetch: bool = _arg(True, "--no-expert-prefetch",
                                 "paged experts: do not load the next MoE layer's likely experts "
                                 "(its router applied early) while the current layer computes")
    state_checkpoint_interval: int = _arg(
        CacheConfig.state_checkpoint_interval, "--state-checkpoint-interval",
        "models with recurrent layers (Qwen3.5): tokens between the prefix cache's state "
        "checkpoints (a multiple of 64 and of --block-size); a hit resumes from the nearest one")
    state_checkpoint_memory: int | str | None = _arg(
        CacheConfig.state_checkpoint_memory, "--state-checkpoint-memory",
        "bytes per rank for those checkpoints, e.g. 2GiB (default: a tenth of the KV budget)")
    max_num_seqs: int = _arg(SchedulerConfig.max_num_seqs, "--max-num-seqs",
                             "sequences in one batch at most")
    max_num_batched_tokens: int | None = _arg(
        None, "--max-num-batched-tokens",
        "tokens per step, prefill chunks included (default: "
        f"{DEFAULT_BATCHED_TOKENS['cpu']} on CPU, {DEFAULT_BATCHED_TOKENS['cuda']} on CUDA)")
    executor: str = _arg(ParallelConfig.executor, help="auto | inprocess | ray")
    ray_address: str | None = _arg(ParallelConfig.ray_address, "--ray-address",
                                   "join this Ray cluster instead of starting one")
    placement_strategy: str = _arg(ParallelConfig.placement_strategy, "--placement-strategy",
                                   "how ranks spread over Ray nodes (STRICT_SPREAD: one rank per node)",
                                   choices=PLACEMENTS)
    seed: int = _arg(EngineConfig.seed, help="seed of the engine's own draws (unseeded requests)")
    cpu_threads: int | None = _arg(EngineConfig.cpu_threads, "--cpu-threads",
                                   "torch threads per rank on CPU")
    skip_tokenizer_init: bool = _arg(False, help="token-id input only")
    shm_allreduce: bool = _arg(ParallelConfig.shm_allreduce,
                               help="CPU ranks on one host reduce through shared memory")
    enforce_eager: bool = _arg(EngineConfig.enforce_eager, "--enforce-eager",
                               "CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    hidden_state_layers: tuple | list = _arg(
        EngineConfig.hidden_state_layers,
        help="decoder layers whose outputs follow the final-norm state in the rows that requests "
             "with return_hidden_states get back ([n, H * (1 + len)]; DFlash drafter training)")
    speculative: str = _arg(
        "auto", "--speculative",
        "speculative decoding method: mtp (the model's MTP layers or a graft; vLLM's deepseek_mtp "
        "and other *_mtp names mean it too), gemma4_assistant (a Gemma 4 assistant drafter) or "
        "dflash (a DFlash block drafter), the drafters given by --speculative-model; auto: the drafter --speculative-model names, else MTP "
        "where the model has MTP layers or a shipped graft, except where CUDA graphs run plain "
        "decode (graphed speculative steps are not yet measured to beat it there)",
        choices=SPECULATIVE_MODES)
    num_speculative_tokens: int = _arg(
        SpeculativeConfig.num_speculative_tokens, "--num-speculative-tokens",
        "drafts per step (K, 1-8); the published figures use K=3 (bench/results/spec.md)")
    speculative_model: str | None = _arg(
        SpeculativeConfig.model, "--speculative-model",
        "the drafter: a graft folder from `dist-engine graft-mtp` (default: the model's own MTP "
        "layers or the graft shipped for it), or a gemma4_assistant or DFlash checkpoint")
    min_draft_acceptance: float = _arg(
        SpeculativeConfig.min_draft_acceptance, "--min-draft-acceptance",
        "propose a draft position only while recent steps accepted it at least this often (every "
        "8th step probes all K); 0 drafts K every step")
    speculative_disable_by_batch_size: int | None = _arg(
        SpeculativeConfig.disable_by_batch_size, "--speculative-disable-by-batch-size",
        "requests admitted while more than this many sequences are in the engine run without "
        "speculation (default: where the draft budget leaves no draft, 8; 0: never)")
    # every SpeculativeConfig setting (Python): e.g. {"num_speculative_tokens": 3, "model": DIR};
    # implies speculation unless ``speculative`` is "none"
    speculative_config: dict | SpeculativeConfig | None = _arg(None)

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("kv_cache_memory", "state_checkpoint_memory", "expert_cache_memory"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_size(getattr(self, name), name))
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {self.quantization!r}")
        if self.expert_cache_policy not in EXPERT_CACHE_POLICIES:
            raise ValueError(f"expert_cache_policy must be one of {EXPERT_CACHE_POLICIES}, "
                             f"got {self.expert_cache_policy!r}")
        if self.speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {SPECULATIVE_MODES}, got {self.speculative!r}")

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> EngineArgs:
        """``EngineArgs`` from ``LLM(...)``'s arguments; an unknown one is a ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine argument(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(sorted(names))}")
        return cls(**({"model": model} if model is not None else {}), **kwargs)

    # ---- resolution against the checkpoint -------------------------------------------------
    def engine_config(self, path: str, mcfg: ModelConfig | None = None) -> EngineConfig:
        """The frozen config for the checkpoint at ``path`` (``self.model`` resolved)."""
        mcfg = mcfg or ModelConfig.from_pretrained(path)
        spec = self.speculative_for(path, mcfg)
        own = mcfg.quantization.method if mcfg.quantization is not None else (
            "fp8" if mcfg.fp8_block is not None else None)
        if self.quantization is not None and own is not None and self.quantization != own:
            raise ValueError(f"{path} is already quantized ({own}); --quantization {self.quantization} "
                             f"must name that method or be left out")
        if self.quantization is not None and own is None and self.quantization not in ON_LOAD_METHODS:
            raise ValueError(f"{path} is not a {self.quantization} checkpoint; a float checkpoint "
                             f"takes --quantization {' or '.join(ON_LOAD_METHODS)}")
        max_len = self.max_model_len or min(mcfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        batched = self.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS[self.device]
        return EngineConfig(
            model=mcfg,
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                    context_parallel_size=self.context_parallel_size,
                                    decode_context_parallel_size=self.decode_context_parallel_size,
                                    executor=self.executor, ray_address=self.ray_address,
                                    shm_allreduce=self.shm_allreduce,
                                    placement_strategy=self.placement_strategy),
            cache=CacheConfig(block_size=(self.block_size if self.block_size is not None
                                          else max(CacheConfig.block_size, mcfg.min_block_size)),
                              num_blocks=self.num_kv_blocks,
                              kv_cache_memory=self.kv_cache_memory,
                              memory_fraction=self.memory_fraction,
                              enable_prefix_caching=self.enable_prefix_caching,
                              kv_cache_dtype=self.kv_cache_dtype,
                              state_checkpoint_interval=self.state_checkpoint_interval,
                              state_checkpoint_memory=self.state_checkpoint_memory),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=batched,
                                      max_model_len=max_len,
                                      num_lookahead_slots=spec.num_lookahead_slots if spec else 0),
            dtype=self.dtype, device=self.device, seed=self.seed, cpu_threads=self.cpu_threads,
            speculative=spec, enforce_eager=self.enforce_eager,
            quantization=self.quantization if own is None else None,
            int8_activations=self.int8_activations,
            hidden_state_layers=tuple(self.hidden_state_layers),
            experts=ExpertCacheConfig(self.expert_cache_memory, self.expert_cache_policy, self.expert_prefetch)
            if self.expert_cache_memory is not None else None)

    def speculative_for(self, path: str, mcfg: ModelConfig) -> SpeculativeConfig | None:
        """Speculation as the user asked: ``none``; ``mtp`` (an error where there is no MTP
        layer); ``auto`` (on where the model ships MTP layers, a graft folder is given or one
        ships for a known model, off where plain decode replays CUDA graphs)."""
        from dist_engine.graft.artifact import check_drafter_base, shipped_graft, speculative_config

        if self.speculative == "none":
            return None
        native = mcfg.num_mtp_layers > 0
        if native and self.speculative == "auto" and not _ships_mtp_weights(path, mcfg):
            # configs keep num_nextn_predict_layers / mtp_num_hidden_layers where the weights were
            # dropped (transformers' save_pretrained does); "mtp" then fails at load, naming the
            # missing tensors
            log.info("speculation off: %s announces %d MTP layer(s) but holds no weights for them",
                     path, mcfg.num_mtp_layers)
            native = False
        if isinstance(self.speculative_config, SpeculativeConfig):
            return self.speculative_config
        spec = {"method": "mtp", "num_speculative_tokens": self.num_speculative_tokens,
                "min_draft_acceptance": self.min_draft_acceptance}
        if self.speculative_disable_by_batch_size is not None:
            spec["disable_by_batch_size"] = self.speculative_disable_by_batch_size
        if self.speculative_model:
            spec["model"] = self.speculative_model
        if self.speculative != "auto":
            spec["method"] = self.speculative
        spec.update(self.speculative_config or {})
        if self.speculative == "auto" and "method" not in (self.speculative_config or {}):
            spec["method"] = drafter_method(spec.get("model")) or "mtp"
        if spec["method"] not in ("mtp", *MTP_ALIASES):  # a drafter model: no graft to look up
            if spec["method"] == "dflash" and spec.get("model"):
                check_drafter_base(spec["model"], path)
            return SpeculativeConfig(**spec)
        if native and not spec.get("model"):
            spec = {**mcfg.native_mtp_settings, **spec}
        if self.speculative == "auto" and self.speculative_config is None:
            if not spec.get("model") and not native and shipped_graft(self.model) is None:
                return None
            if (not spec.get("model") and self.device == "cuda" and not self.enforce_eager
                    and decode_graphs_apply(mcfg, self.tensor_parallel_size,
                                            self.context_parallel_size,
                                            self.decode_context_parallel_size)):
                log.info("speculation off: on CUDA plain decode replays CUDA graphs and graphed "
                         "speculative steps are not yet measured to beat it; --speculative mtp "
                         "forces it")
                return None
        return speculative_config(spec, path, self.model, native)


def drafter_method(folder: str | None) -> str | None:
    """The speculative method a drafter folder's config.json names, if any (its model_type, or
    DFlash's architecture)."""
    if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    if "DFlashDraftModel" in (raw.get("architectures") or []):
        return "dflash"
    return raw.get("model_type") if raw.get("model_type") in METHODS else None


def _ships_mtp_weights(path: str, mcfg: ModelConfig) -> bool:
    """Any tensor of the MTP layers (``model.layers.{L}.*``, or Qwen3.5's ``mtp.*``)."""
    from dist_engine.weights.loader import tensor_names

    prefixes = mcfg.mtp_prefixes
    return bool(prefixes) and any(name.startswith(prefixes) for name in tensor_names(path))


def _check_types(args: EngineArgs) -> None:
    """Each field holds a value of its annotated type (an int where a float is wanted is
    fine): a wrong type is a ``ValueError`` naming the field, not a ``TypeError`` deep inside."""
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        allowed = tuple(typing.get_origin(t) or t for t in allowed)
        if float in allowed:
            allowed += (int,)
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{f.name} must be {names}, got {value!r}")
