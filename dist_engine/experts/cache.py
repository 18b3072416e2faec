"""One rank's expert cache: slots under the budget, what each holds, and one loading thread.

Bookkeeping happens only on the thread that runs the model; the loading thread reads an
expert's tensors and writes them into the slot it was handed (a slot being loaded is never
computed with, and a slot in use is pinned, so never handed out). A slot is free, loading
(``future`` pending), or ready; ready slots with no pin are what the eviction policy picks from.
Prefetched experts are protected until the layer they were fetched for has run, so that one
layer's prefetches do not evict each other; a demand load may still take them when nothing else
is left (no deadlock, whatever the budget).

Sizes: a slot is one expert in its layer's format (on CPU: packed panels). The budget pays for
the slots and, on CPU, for the loader's staging copy (one dense expert and the read buffer);
the fewest slots that work are one token's experts (``top_k``), because a step with more
experts than slots streams them through the cache in waves.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from dist_engine.config import ExpertCacheConfig
from dist_engine.experts.formats import ExpertFormat, refill_packed, slot_copy
from dist_engine.experts.paged import PagedLayer
from dist_engine.experts.policy import EvictionPolicy
from dist_engine.experts.slots import Key, LoadPlan, Slot, fmt, packs, refill, zero_fill
from dist_engine.experts.source import ExpertIndex, FileReader, HostReader, drop_page_cache
from dist_engine.experts.stats import ExpertCacheStats, process_rss
from dist_engine.layers.linear import pack_weights, weight_bytes

log = logging.getLogger(__name__)
HOST_TIER_FRACTION = 0.8  # CUDA: pin every expert in host memory if they fit in this much of it
LFU_HALF_LIFE_FORWARDS = 16


class ExpertCache:
    def __init__(self, config: ExpertCacheConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.cuda = device.type == "cuda"
        self.layers: list[PagedLayer] = []
        self._make_expert: Callable[[], nn.Module] | None = None
        self.slots: list[Slot] = []
        self.free: list[Slot] = []
        self.where: dict[Key, Slot] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.staging: nn.Module | None = None
        self.file_reader: FileReader | None = None
        self.tier = ""
        self.seq = 0  # loads submitted so far
        self.prefetched_for: dict[str, list[Slot]] = {}  # layer prefix -> slots prefetched for it
        self.dry = False  # layers compute with one slot's weights and load nothing (dry_run)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.hits = self.misses = self.prefetches = self.prefetch_hits = self.evictions = 0
        self.bytes_read = self.tokens = 0
        self.wait_s = 0.0
        for layer in self.layers:
            layer.hits = layer.misses = 0

    # ---- set-up -----------------------------------------------------------------------------
    def register(self, layer: int, prefix: str, expert_range: tuple[int, int],
                 make_expert: Callable[[], nn.Module], router: nn.Module) -> PagedLayer:
        """A MoE layer (checkpoint index ``layer``, experts under ``prefix``) pages its experts
        ``[first, first + count)`` here; ``make_expert`` builds one expert module, ``router``
        maps hidden states to (weights, ids) and serves the previous layer's prefetch."""
        paged = PagedLayer(self, prefix, layer, expert_range, router)
        self.layers.append(paged)
        self._make_expert = self._make_expert or make_expert
        return paged

    def start(self, path: str, packed: dict[str, tuple[str, object]],
              rename: Callable[[str], str | None] | None = None, quantization: str | None = None,
              int8_activations: bool = False) -> None:
        """Index the checkpoint (``rename``: the model's stored name -> our name), check the
        budget, allocate the slots, start the loader. ``quantization`` / ``int8_activations``:
        the engine's ``--quantization`` and ``--int8-activations`` (slots hold what a resident
        expert would)."""
        self.layers.sort(key=lambda p: p.layer)
        for a, b in zip(self.layers, self.layers[1:]):
            a.next = b  # prefetch: each layer warms the next one it runs into
        self.layers[0].counts_tokens = True
        # LFU's counts halve over the touches of this many forward passes
        per_forward = sum(min(p.expert_range[1], p.router.top_k) for p in self.layers)
        self.policy = EvictionPolicy(self.config.policy, LFU_HALF_LIFE_FORWARDS * per_forward)
        self.index = ExpertIndex(path, {p.prefix: p.expert_range for p in self.layers}, rename)
        drop_page_cache(sorted({r.file for refs in self.index.refs.values() for r in refs.values()}))
        self.format = ExpertFormat(path, quantization, int8_activations)
        read_bytes = self.index.expert_nbytes()
        with torch.device(self.device):
            staging = self._make_expert()
            self.plan = LoadPlan(staging, packed)
            self.index.check_complete(self.plan.suffixes, self.format.name)
            probe = self._make_expert()
            if self.format.quantized:
                self.format.learn_form(probe, staging, self.plan, self.index, read_bytes)
            pack_weights(probe)
        self.expert_bytes = weight_bytes(probe)
        self.staging = staging if packs(probe) else None
        overhead = (0 if self.cuda else read_bytes) + (weight_bytes(staging) if self.staging is not None else 0)
        wave = max(min(p.expert_range[1], p.router.top_k) for p in self.layers)
        need = wave * self.expert_bytes + overhead
        budget = self.config.memory
        total = len(self.index.refs)
        if budget < need:
            buffer = f" plus {fmt(overhead)} for the loader's staging copy and read buffer" if overhead else ""
            raise ValueError(
                f"expert_cache_memory={fmt(budget)} is below the minimum of {fmt(need)} for this model on "
                f"this rank: {wave} experts of {fmt(self.expert_bytes)} (one token's top-k){buffer}; "
                f"raise it to at least {need} bytes (all {total} routed experts of this rank take "
                f"{fmt(total * self.expert_bytes)})")
        n_slots = min(total, (budget - overhead) // self.expert_bytes)
        zero_fill(probe)  # then copies of it: every byte touched, so resident from start-up
        self.slots = [Slot(probe, self.cuda)] + [Slot(slot_copy(probe), self.cuda) for _ in range(n_slots - 1)]
        self.free = list(reversed(self.slots))
        self.reader, self.tier = self._reader(read_bytes)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="expert-loader")
        log.info("expert cache: %d of %d routed experts of this rank resident at once (%s each, %s of "
                 "%s), %s policy, prefetch %s, source: %s", n_slots, total, fmt(self.expert_bytes),
                 fmt(n_slots * self.expert_bytes + overhead), fmt(total * self.expert_bytes), self.config.policy,
                 "on" if self.config.prefetch else "off", self.tier)

    def _reader(self, read_bytes: int) -> tuple[Callable[[Key], dict[str, torch.Tensor]], str]:
        """How a load gets an expert's tensors, and the tier's name for the log."""
        if self.cuda:
            import psutil

            if len(self.index.refs) * read_bytes < psutil.virtual_memory().available * HOST_TIER_FRACTION:
                return HostReader(self.index).read_key, "pinned host memory"
        self.file_reader = FileReader(read_bytes, pin=self.cuda)
        return (lambda key: self.file_reader.read(self.index.refs[key]),
                "checkpoint files (pread, page cache dropped)")

    @contextlib.contextmanager
    def dry_run(self):
        """Layers run the experts they need with one slot's weights and load nothing: start-up's
        activation profiling needs the shapes, not the values, and would otherwise read every
        expert of the model once (a prefill chunk routes to nearly all of them)."""
        self.dry = True
        try:
            yield
        finally:
            self.dry = False

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.file_reader is not None:
            self.file_reader.close()

    # ---- the model thread's calls -------------------------------------------------------------
    def begin_forward(self, token_ids: torch.Tensor) -> None:
        """A forward pass over ``token_ids`` ``[T]`` starts. A hash-routed first MoE layer
        (DeepSeek-V4's) picks its experts from the token ids alone, so they start loading now,
        exactly, overlapping the embedding and the first attention (each later layer prefetches
        the next one's, exactly where that one is hash-routed too)."""
        if self.dry or not self.config.prefetch or not self.layers:
            return
        first = self.layers[0]
        if getattr(first.router, "tid2eid", None) is not None:
            first.prefetch(None, token_ids)

    def claim(self, key: Key) -> Slot | None:
        """Pin ``key``'s slot if it is resident or loading (a hit)."""
        slot = self.where.get(key)
        if slot is None:
            return None
        slot.pins += 1
        if slot.prefetched:
            slot.prefetched = False
            self.prefetch_hits += 1
        self.policy.touch(key)
        return slot

    def start_load(self, key: Key, prefetch: bool = False) -> Slot | None:
        """Start loading ``key`` into a free or evicted slot (pinned unless a prefetch), or None
        when every slot is pinned, loading or (for a prefetch) protected."""
        slot = self.free.pop() if self.free else self._evict(prefetch)
        if slot is None:
            return None
        slot.key, slot.pins, slot.prefetched = key, 0 if prefetch else 1, prefetch
        self.where[key] = slot
        self.policy.touch(key)
        self.bytes_read += self._nbytes(key)
        if prefetch:
            self.prefetches += 1
            self.prefetched_for.setdefault(key[0], []).append(slot)
        self.seq += 1
        slot.seq = self.seq
        slot.future = self.pool.submit(self._load, slot, key)
        return slot

    def _evict(self, prefetch: bool) -> Slot | None:
        def evictable(k: Key, protect: bool) -> bool:
            s = self.where[k]
            return s.pins == 0 and s.ready and not (protect and s.prefetched)

        key = self.policy.victim(lambda k: evictable(k, True))
        if key is None and not prefetch:
            key = self.policy.victim(lambda k: evictable(k, False))
        if key is None:
            return None
        slot = self.where.pop(key)
        slot.key, slot.prefetched = None, False
        self.evictions += 1
        return slot

    def _load(self, slot: Slot, key: Key) -> None:
        """On the loading thread: ``key``'s tensors into ``slot``."""
        tensors = self.reader(key)
        if not self.cuda:
            return self._fill(slot, key, tensors)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(slot.released)  # the compute stream's last read of the slot
            self._fill(slot, key, tensors)
            self.stream.synchronize()

    def _fill(self, slot: Slot, key: Key, tensors: dict[str, torch.Tensor]) -> None:
        """Straight into the slot, or through the staging expert: packed into the slot's
        panels (CPU) and, quantized, stacked and packed into its ``QWeight`` buffers."""
        if self.staging is None:
            return self.plan.load(slot.module, tensors)
        self.plan.load(self.staging, self.format.tensors(tensors))
        if self.format.quantized:
            refill_packed(slot.module, self.format.packs(self.staging), f"{key[0]}{key[1]}")
        refill(slot.module, self.staging)

    def wait(self, slot: Slot) -> None:
        """Block until ``slot``'s load is done (re-raising its error)."""
        if slot.future is None:
            return
        t0 = time.perf_counter()
        try:
            slot.future.result()
        except BaseException:
            self._drop(slot)
            raise
        finally:
            self.wait_s += time.perf_counter() - t0
        slot.future = None

    def wait_any_load(self) -> None:
        """Block until the oldest load in flight finishes (every slot is busy)."""
        loading = [s for s in self.slots if not s.ready]
        if loading:
            self.wait(min(loading, key=lambda s: s.seq))

    def release(self, slot: Slot) -> None:
        slot.pins -= 1
        if self.cuda:
            slot.released.record()

    def settle_prefetches(self, prefix: str, needed: set[int]) -> None:
        """The layer ``prefix`` is running: its prefetches that routing did not pick are cancelled
        if still queued, else stop being protected and become the first to evict."""
        for s in self.prefetched_for.pop(prefix, ()):
            if s.prefetched and s.key[0] == prefix and s.key[1] not in needed:
                s.prefetched = False
                if s.future is not None and s.future.cancel():  # never read: not counted
                    self.prefetches -= 1
                    self.bytes_read -= self._nbytes(s.key)
                    self._drop(s)
                else:
                    self.policy.demote(s.key)

    def _nbytes(self, key: Key) -> int:
        return sum(r.nbytes for r in self.index.refs[key].values())

    def _drop(self, slot: Slot) -> None:
        if slot.key is not None:
            self.where.pop(slot.key, None)
            self.policy.forget(slot.key)
        slot.key, slot.future, slot.pins, slot.prefetched = None, None, 0, False
        self.free.append(slot)

    def stats(self) -> ExpertCacheStats:
        anon, file = process_rss()
        return ExpertCacheStats(
            budget_bytes=self.config.memory, num_slots=len(self.slots), expert_bytes=self.expert_bytes,
            num_experts=len(self.index.refs), resident_bytes=len(self.where) * self.expert_bytes,
            hits=self.hits, misses=self.misses, prefetches=self.prefetches,
            prefetch_hits=self.prefetch_hits, evictions=self.evictions, bytes_read=self.bytes_read,
            tokens=self.tokens, wait_s=round(self.wait_s, 6), rss_anon_bytes=anon, rss_file_bytes=file)
