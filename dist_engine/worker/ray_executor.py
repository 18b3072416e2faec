"""Ray executor: one ShardWorker actor per rank, SPMD, in a placement group.

Every call goes to all ranks at once and the driver waits on all of them together; if any
actor dies, the others are killed at once (they would otherwise sit in a collective until its
timeout) and the caller gets EngineDeadError within a poll interval.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dist_engine.config import EngineConfig
from dist_engine.experts.stats import ExpertCacheStats
from dist_engine.kv_cache.kinds import CacheLayout
from dist_engine.worker.executor import EngineDeadError, Executor
from dist_engine.worker.messages import StepInput, StepOutput
from dist_engine.worker.shard_worker import ShardWorker

log = logging.getLogger(__name__)
POLL_S = 0.5
PING_EVERY_S = 2.0  # during a long call, ping every rank this often...
PING_TIMEOUT_S = 8.0  # ...and give up on the engine if one stays silent this long


# The GCS address of the local Ray instance this process started for its engines (None: none),
# so that a later, larger engine may restart it with more logical CPUs; an instance with any
# other address is the user's.
_local_ray: str | None = None
_live_executors: set[int] = set()  # id() of RayExecutors not yet shut down in this process


def ensure_ray(address: str | None, world_size: int) -> None:
    """Connect to ``address``, or start (or grow) a local Ray instance with a logical CPU per
    rank. A local instance this process started is restarted larger when a later engine needs
    more ranks than it declared and no engine of this process still runs on it; a cluster the
    user started or named is never torn down, only checked."""
    global _local_ray
    if ray.is_initialized():
        declared = int(ray.cluster_resources().get("CPU", 0))
        if declared >= world_size:
            return
        if address or _local_ray != ray.get_runtime_context().gcs_address:
            raise ValueError(f"the Ray cluster this process is connected to declares {declared} "
                             f"CPUs, fewer than the {world_size} ranks asked for; start it with "
                             f"more (ray start --num-cpus {world_size}) or use fewer ranks")
        if _live_executors:
            raise ValueError(f"the local Ray instance holds {declared} CPUs and another engine of "
                             f"this process still runs on it; shut that engine down before "
                             f"starting one of {world_size} ranks")
        log.info("restarting the local Ray instance with %d CPUs (it had %d)", world_size, declared)
        ray.shutdown()
        _local_ray = None
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A local instance: declare at least one logical CPU per rank, so four ranks fit on a
    # two-core machine (each rank sets its own torch thread count).
    # address="local": always a fresh instance, even if an earlier `ray start` on this machine
    # left its address behind in /tmp/ray
    cpus = max(world_size, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
             log_to_driver=True, configure_logging=False)
    _local_ray = ray.get_runtime_context().gcs_address


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        par = config.parallel
        world = par.world_size
        ensure_ray(par.ray_address, world)
        gpu = config.device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(world)], strategy=par.placement_strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=par.placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"could not place {world} ranks of {bundle} ({par.placement_strategy}) within "
                f"{par.placement_timeout_s:.0f}s; "
                f"the Ray cluster has {ray.available_resources()} available. Add nodes/GPUs or "
                "lower --tp"
            )
        _live_executors.add(id(self))
        self.workers: list = []
        self._dead = False
        try:
            self._start_workers(config)
        except BaseException:
            self._kill()  # no actor or placement group outlives a failed start
            raise

    def _start_workers(self, config: EngineConfig) -> None:
        world, gpu = config.parallel.world_size, config.device == "cuda"
        actor_cls = ray.remote(ShardWorker)
        self.workers = [
            actor_cls.options(
                num_cpus=1,
                num_gpus=1 if gpu else 0,
                max_concurrency=2,  # lets ping() answer while execute() runs
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(config, i, world)
            for i in range(world)
        ]
        master = self._all(lambda w: w.address.remote(), only=[0])[0]
        self._all(lambda w: w.init_distributed.remote(master))
        self.load_seconds = max(self._all(lambda w: w.load_model.remote()))

    def _all(self, call: Callable[[Any], Any], only: list[int] | None = None,
             timeout: float | None = None) -> list[Any]:
        """Run ``call`` on every worker (or those in ``only``) and wait for all, watching deaths."""
        if self._dead:
            raise EngineDeadError("the engine's workers are gone; restart the engine")
        workers = self.workers if only is None else [self.workers[i] for i in only]
        refs = [call(w) for w in workers]
        pending = list(refs)
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        pings: list = []  # (sent at, refs) while a long call runs
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                try:
                    ray.get(ref)
                except RayError as e:
                    self._abort(f"a shard worker failed: {type(e).__name__}: {e}")
            now = time.monotonic()
            if deadline is not None and now > deadline and pending:
                self._abort(f"shard workers did not answer within {timeout:.0f}s")
            if pending and only is None and now - start > PING_EVERY_S:
                # A long call (big prefill, or a rank stuck in a collective with a lost peer):
                # every rank must still answer a ping on its second thread, or it is gone.
                if not pings or now - pings[-1][0] > PING_EVERY_S:
                    pings.append((now, [w.ping.remote() for w in self.workers]))
                sent, prefs = pings[0]
                ready, _ = ray.wait(prefs, num_returns=len(prefs), timeout=0)
                if len(ready) == len(prefs):
                    pings.pop(0)
                elif now - sent > PING_TIMEOUT_S:
                    self._abort(f"a shard worker stopped answering for {PING_TIMEOUT_S:.0f}s "
                                "(its node may be lost)")
        return ray.get(refs)

    def _abort(self, why: str) -> None:
        self._dead = True
        log.error("%s; tearing down all workers", why)
        self._kill()
        raise EngineDeadError(why)

    def _kill(self) -> None:
        _live_executors.discard(id(self))
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass

    def cache_layout(self) -> CacheLayout:
        return functools.reduce(CacheLayout.min, self._all(lambda w: w.cache_layout.remote()))

    def cache_info(self) -> dict:
        return self._all(lambda w: w.cache_info.remote(), only=[0])[0]

    def init_cache(self, layout: CacheLayout) -> None:
        self._all(lambda w: w.init_cache.remote(layout))

    def execute(self, step: StepInput) -> StepOutput:
        outs = self._all(lambda w: w.execute.remote(step))
        if any(o.sampled.keys() != outs[0].sampled.keys() or
               any(o.sampled[k].token_ids != outs[0].sampled[k].token_ids for k in o.sampled)
               for o in outs[1:]):
            self._abort("ranks sampled different tokens (they must stay bit-identical)")
        if outs[0].experts is not None:  # each rank pages its own experts
            return replace(outs[0], experts=ExpertCacheStats.merge([o.experts for o in outs]))
        return outs[0]

    def check_health(self) -> None:
        self._all(lambda w: w.ping.remote(), timeout=PING_TIMEOUT_S)

    def comm_stats(self) -> list[dict[str, dict[str, int]]]:
        return self._all(lambda w: w.comm_stats.remote())

    def shutdown(self) -> None:
        if self._dead:
            return
        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=10)
        except (RayActorError, GetTimeoutError, RayError):
            pass
        self._dead = True
        self._kill()
