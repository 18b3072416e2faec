"""Frozen, validated configuration objects, one module per concern:
``model`` (a checkpoint's config.json), ``runtime`` (ranks, KV cache, expert cache, scheduler),
``speculative`` (MTP drafting) and ``engine`` (all of them, checked together); ``args`` is what
a user sets (``LLM``'s keyword arguments and the CLI's flags, with the defaults) and ``sizes``
parses sizes and durations.

Every config checks itself in ``__post_init__`` and raises ``ValueError`` with a message that says
what to change. Configs cross process boundaries (they are pickled to Ray actors), so they hold
only plain data.
"""

from dist_engine.config.args import EngineArgs
from dist_engine.config.engine import EngineConfig
from dist_engine.config.model import DTYPES, SUPPORTED_ARCHITECTURES, ModelConfig
from dist_engine.config.runtime import (
    EXPERT_CACHE_POLICIES,
    KV_CACHE_DTYPES,
    CacheConfig,
    ExpertCacheConfig,
    ParallelConfig,
    SchedulerConfig,
)
from dist_engine.config.speculative import CONCAT_ORDERS, DRAFT_DTYPES, STAGES, SpeculativeConfig

__all__ = [
    "CONCAT_ORDERS", "DRAFT_DTYPES", "DTYPES", "EXPERT_CACHE_POLICIES", "KV_CACHE_DTYPES", "STAGES",
    "SUPPORTED_ARCHITECTURES", "CacheConfig", "EngineArgs", "EngineConfig", "ExpertCacheConfig",
    "ModelConfig", "ParallelConfig", "SchedulerConfig",
    "SpeculativeConfig",
]
