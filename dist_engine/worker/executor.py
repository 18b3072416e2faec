"""The executor interface, and the in-process executor (one rank, no Ray).

The engine talks to its shard workers only through these methods, one round trip per engine
step; the Ray executor (``ray_executor.py``) implements the same interface for many ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from dist_engine.config import EngineConfig
from dist_engine.kv_cache.kinds import CacheLayout
from dist_engine.worker.messages import StepInput, StepOutput
from dist_engine.worker.shard_worker import ShardWorker


class EngineDeadError(RuntimeError):
    """A shard worker died or stopped answering; the engine cannot continue."""


class Executor(ABC):
    config: EngineConfig

    @abstractmethod
    def cache_layout(self) -> CacheLayout:
        """Blocks, state slots and checkpoints every rank can hold (the minimum over ranks)."""

    @abstractmethod
    def cache_info(self) -> dict:
        """bytes_per_block, state_bytes_per_seq, bytes per token of each paged kind, the bytes
        allocated per kind, weight_bytes and (when measured) activation_peak_bytes and
        kv_budget_bytes of one rank."""

    @abstractmethod
    def init_cache(self, layout: CacheLayout) -> None: ...

    @abstractmethod
    def execute(self, step: StepInput) -> StepOutput: ...

    @abstractmethod
    def check_health(self) -> None:
        """Raise EngineDeadError if any worker is gone."""

    @abstractmethod
    def shutdown(self) -> None: ...

    @abstractmethod
    def comm_stats(self) -> list[dict[str, dict[str, int]]]:
        """Per rank: bytes and calls each of its collective groups has sent so far."""


class InProcessExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.worker = ShardWorker(config, rank=0, local_ranks=1)
        self.worker.init_distributed(None)
        self.load_seconds = self.worker.load_model()

    def cache_layout(self) -> CacheLayout:
        return self.worker.cache_layout()

    def cache_info(self) -> dict:
        return self.worker.cache_info()

    def init_cache(self, layout: CacheLayout) -> None:
        self.worker.init_cache(layout)

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute(step)

    def check_health(self) -> None:
        pass

    def comm_stats(self) -> list[dict[str, dict[str, int]]]:
        return [self.worker.comm_stats()]

    def shutdown(self) -> None:
        self.worker.shutdown()


def make_executor(config: EngineConfig) -> Executor:
    if config.parallel.use_ray:
        from dist_engine.worker.ray_executor import RayExecutor

        return RayExecutor(config)
    return InProcessExecutor(config)
