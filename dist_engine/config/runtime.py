"""How the engine runs a model: rank layout, KV cache sizing, scheduling limits."""

from __future__ import annotations

from dataclasses import dataclass

from dist_engine.config.model import DTYPES
from dist_engine.config.sizes import parse_size


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


# turboquant4 / turboquant3: 4- or 3-bit TurboQuant codes and an fp16 scale per K/V row
KV_CACHE_DTYPES = ("auto", *DTYPES, "fp8_e4m3", "turboquant4", "turboquant3")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16
    # Exactly this many blocks per rank (tests); otherwise sized from kv_cache_memory or
    # memory_fraction. With context parallelism the whole cache holds CP times as many.
    num_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes per rank (or a size string: "2GiB")
    memory_fraction: float = 0.5  # of the memory left after weights and peak activations
    enable_prefix_caching: bool = True
    # storage of K/V: "auto" (the model dtype), a float dtype, "fp8_e4m3" (one byte per
    # element with per-layer scales calibrated at start-up; half the bytes of bfloat16), or
    # "turboquant4" / "turboquant3" (4 / 3 bits per element plus an fp16 scale per head and
    # token, rotated and codebook-quantized: 3.8x / 4.9x fewer bytes than bfloat16 at head 64)
    kv_cache_dtype: str = "auto"
    # Models with recurrent layers (Gated DeltaNet): a prefix-cache hit resumes from a state
    # checkpoint kept every this many tokens (a multiple of 64, the delta rule's chunk, and of
    # block_size), within their own budget: bytes per rank (None: a tenth of the KV budget; 8
    # checkpoints when num_blocks is fixed).
    state_checkpoint_interval: int = 512
    state_checkpoint_memory: int | None = None

    def __post_init__(self) -> None:
        if self.kv_cache_memory is not None:
            object.__setattr__(self, "kv_cache_memory", parse_size(self.kv_cache_memory, "kv_cache_memory"))
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.state_checkpoint_memory is not None:
            object.__setattr__(self, "state_checkpoint_memory",
                               parse_size(self.state_checkpoint_memory, "state_checkpoint_memory"))
            if self.state_checkpoint_memory < 0:
                raise ValueError("state_checkpoint_memory must be >= 0 (0: no prefix caching for "
                                 "models with recurrent layers)")
        step = max(64, self.block_size)
        if self.state_checkpoint_interval < step or self.state_checkpoint_interval % step:
            raise ValueError(f"state_checkpoint_interval must be a positive multiple of {step} (the "
                             f"delta rule's 64-token chunk and block_size={self.block_size}), got "
                             f"{self.state_checkpoint_interval}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


EXPERT_CACHE_POLICIES = ("lfu", "lru")


@dataclass(frozen=True)
class ExpertCacheConfig:
    """Routed experts paged under a memory budget per rank (``--expert-cache-memory``).

    The experts stay in the checkpoint files (or, on CUDA, in pinned host memory) and a cache
    of ``memory`` bytes on the compute device holds the ones in use; ``policy`` picks what to
    evict (``lfu``: least frequently used, counts decaying; ``lru``: least recently used);
    ``prefetch`` applies each MoE layer's successor's router to the current hidden states and
    starts loading the experts it picks while the current layer computes.
    """

    memory: int  # bytes per rank (or a size string: "4GiB")
    policy: str = "lfu"
    prefetch: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory", parse_size(self.memory, "expert_cache_memory"))
        if self.memory <= 0:
            raise ValueError(f"expert_cache_memory must be a positive number of bytes, got {self.memory}")
        if self.policy not in EXPERT_CACHE_POLICIES:
            raise ValueError(f"expert_cache_policy must be one of {', '.join(EXPERT_CACHE_POLICIES)}, "
                             f"got {self.policy!r}")


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
