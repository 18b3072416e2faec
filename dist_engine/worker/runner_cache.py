"""The runner's KV cache and recurrent state: sizing (bytes per block, the budget and the
activation peak it leaves), allocation per cache kind, and the start-up passes that fill FP8
scales and TurboQuant mean keys. A mixin of ``ModelRunner``, which holds the kinds, groups,
caches and the forward pass these methods use."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from dist_engine.kv_cache.kinds import (
    CacheLayout,
    PagedKV,
    bytes_per_block,
    paged_groups,
    state_bytes_per_seq,
)
from dist_engine.worker.caches import allocate, by_layer, bytes_by_group, flat_caches, plan_layout
from dist_engine.worker.messages import SeqWork, StepInput

log = logging.getLogger(__name__)


class RunnerCaches:
    # ---- KV cache sizing -------------------------------------------------------------------
    def bytes_per_block(self) -> dict[str, int]:
        """Per paged group (primary first): its layers' rows of one block on this rank."""
        per = bytes_per_block(self.kinds, self.block_size)
        return {g: per[g] for g in paged_groups(self.kinds)}

    def kv_bytes_per_block(self) -> int:
        """The primary group's block, all its layers, this rank."""
        return next(iter(self.bytes_per_block().values()), 0)

    def state_bytes_per_seq(self) -> int:
        """Every recurrent layer's state of one sequence on this rank (0: none)."""
        return state_bytes_per_seq(self.kinds)

    def cache_layout(self, local_ranks: int) -> CacheLayout:
        """What this rank can hold: the configured block count, or ``--kv-cache-memory``, or a
        fraction of the memory left after the weights and a measured activation peak, split
        between the kinds (``caches.plan_layout``)."""
        cc, sc = self.config.cache, self.config.scheduler
        if cc.num_blocks is not None:
            return plan_layout(self.kinds, self.config, None)
        per_block = self.kv_bytes_per_block()
        if cc.kv_cache_memory is not None:
            return plan_layout(self.kinds, self.config, max(cc.kv_cache_memory, per_block))
        peak = self.profile_activation_peak()
        if self.device.type == "cuda":
            _, total = torch.cuda.mem_get_info(self.device)
            budget = total * cc.memory_fraction - torch.cuda.memory_allocated(self.device) - peak
        else:
            import psutil  # CPU only; comes with Ray

            # weights are already resident, so "available" is what is left after them
            budget = psutil.virtual_memory().available * cc.memory_fraction / max(1, local_ranks) - peak
        self.memory_report.update(activation_peak_bytes=peak, kv_budget_bytes=int(budget))
        if budget < per_block + self.state_bytes_per_seq():
            raise ValueError(
                f"no memory left for the KV cache: weights {self.weight_bytes() / 2**20:.0f} MiB and "
                f"an activation peak of {peak / 2**20:.0f} MiB leave {budget / 2**20:.0f} MiB at "
                f"memory_fraction={cc.memory_fraction}; raise it, lower --max-num-batched-tokens, "
                "or add ranks"
            )
        layout = plan_layout(self.kinds, self.config, int(budget))
        # On CPU there is no reason to pin more than every sequence at full length could use.
        blocks_per_seq = (sc.max_model_len + self.block_size - 1) // self.block_size
        (primary, n), *rest = layout.blocks
        return dataclasses.replace(layout, blocks=((primary, min(n, blocks_per_seq * sc.max_num_seqs + 1)),
                                                   *rest))

    def profile_activation_peak(self) -> int:
        """Bytes of activations of one worst-case prefill chunk (``max_num_batched_tokens``).

        CUDA: the allocator's peak. CPU: the process's resident-set peak, sampled by a thread
        while the chunk runs, less the K/V it wrote into the scratch cache.
        """
        n = min(self.config.scheduler.max_num_batched_tokens, self.config.scheduler.max_model_len)
        blocks = (n + self.block_size - 1) // self.block_size
        self.init_cache(self._scratch_layout(blocks + 1))
        work = self._scratch_work((0,) * n, blocks)
        step = StepInput(step_id=-1, seqs=(work,))
        sc = self.seq_comm  # with sequence shards this rank writes only its own blocks
        own = sum(1 for b in range(1, blocks + 1) if sc is None or b % sc.world_size == sc.rank)
        kv_written = own * sum(self.bytes_per_block().values())  # every group; block 0 zeroed before
        # paged experts: the same shapes, none read (the chunk's output is discarded)
        dry = self.expert_cache.dry_run() if self.expert_cache is not None else contextlib.nullcontext()
        with dry:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
                self.execute(step)
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) - base
            else:
                peak = _rss_peak_during(lambda: self.execute(step)) - kv_written
        self._drop_caches()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return max(0, int(peak))

    def _scratch_layout(self, num_blocks: int) -> CacheLayout:
        """Caches for one start-up pass (profiling, calibration): every group's table is the
        same ``num_blocks``, one state slot if any."""
        return CacheLayout(tuple((g, num_blocks) for g in paged_groups(self.kinds)), int(self.has_state), 0)

    def _scratch_work(self, ids: tuple[int, ...], blocks: int) -> SeqWork:
        table = tuple(range(1, blocks + 1))
        return SeqWork(seq_id=-1, token_ids=ids, start_pos=0, block_table=table, sample=True,
                       state_slot=0 if self.has_state else None,
                       group_tables=(table,) * (len(self.groups) - 1))

    def init_cache(self, layout: CacheLayout) -> None:
        """Allocate ``layout`` on this rank (with sequence shards, local block i is global block
        i * shards + shard). FP8 caches get their scales, TurboQuant caches their mean keys
        from a calibration pass first."""
        if self.kv_dtype == torch.float8_e4m3fn and self.kv_scales is None:
            self.kv_scales = self.calibrate_kv_scales()
        if self.tq_preset is not None and self.kv_means is None:
            self.kv_means = self.calibrate_kv_means()
        self._make_caches(layout, None, self.kv_scales)
        if self.expert_cache is not None:  # count serving only, not the start-up passes
            self.expert_cache.reset_stats()

    def _make_caches(self, layout: CacheLayout, dtype: torch.dtype | None,
                     scales: list[tuple[float, float]] | None) -> None:
        scratch = self.graphs is not None  # one more block, for the padding rows of graphs
        self.layout = layout
        flat = allocate(self.kinds, layout, self.block_size, self.device, zero_slots=self.block_size,
                        extra_blocks=int(scratch), scales=scales, dtype=dtype, k_means=self.kv_means,
                        kv_head_start=self.kv_head_start)
        self.kv_caches = by_layer(flat, self.layer_kinds)
        n = len(self.drafter.cache_layers()) if self.drafter is not None else 0
        if n:  # the drafter's own layers' caches (last): same blocks and slots
            self.kv_caches, self.drafter.caches = self.kv_caches[:-n], self.kv_caches[-n:]
        if scratch:
            self.graphs.bind(layout)

    def allocated_bytes(self) -> dict[str, int]:
        """Bytes allocated per kind group (a drafter layer's cache included)."""
        return bytes_by_group(self._all_caches(), self.kinds)

    def _all_caches(self) -> list:
        """Every kind's storage: the model's, then the drafter layers', in ``self.kinds`` order."""
        return flat_caches(self.kv_caches + (self.drafter.caches if self.drafter is not None else []))

    def _drop_caches(self) -> None:
        self.kv_caches = []
        if self.drafter is not None:
            self.drafter.caches = []

    def calibrate_kv_scales(self, num_tokens: int = 256) -> list[tuple[float, float]]:
        """Per-layer FP8 scales from the largest |K| and |V| of the calibration prefill."""
        # per kind (recurrent state has no K/V and a shared kind uses its source's: unused)
        scales = [c.calibrated_scales() if isinstance(k, PagedKV) else (1.0, 1.0)
                  for k, c in zip(self.kinds, self._calibration_prefill(num_tokens))]
        log.info("FP8 KV scales calibrated: K %.3g..%.3g, V %.3g..%.3g",
                 min(k for k, _ in scales), max(k for k, _ in scales),
                 min(v for _, v in scales), max(v for _, v in scales))
        return scales

    def calibrate_kv_means(self, num_tokens: int = 256) -> list[torch.Tensor | None]:
        """Per-layer mean keys ``[local_num_kv_heads, head_dim]`` of the calibration prefill,
        which TurboQuant caches subtract before quantizing (None: a recurrent layer, or a
        shared latent)."""
        means = [c.calibrated_mean() if isinstance(k, PagedKV) else None
                 for k, c in zip(self.kinds, self._calibration_prefill(num_tokens))]
        norms = [m.norm(dim=-1) for m in means if m is not None]
        if norms:
            log.info("TurboQuant mean keys calibrated: norm %.3g..%.3g",
                     min(n.min().item() for n in norms), max(n.max().item() for n in norms))
        return means

    def _calibration_prefill(self, num_tokens: int) -> list:
        """Every kind's cache (aligned with ``self.kinds``, a drafter's last; paged ones in full
        precision) after observing one prefill of pseudo-random tokens, the same on every rank
        (so sequence shards of one tensor agree). The caches are not kept."""
        n = min(num_tokens, self.config.scheduler.max_model_len)
        blocks = (n + self.block_size - 1) // self.block_size
        self._make_caches(self._scratch_layout(blocks + 1), self.dtype, None)
        caches = self._all_caches()  # aligned with self.kinds
        for kv, kind in zip(caches, self.kinds):
            if isinstance(kind, PagedKV):
                kv.observe = True
        self.calibrating = True  # every rank runs every token, so CP shards see the same
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.config.model.vocab_size, (n,), generator=gen).tolist()
        work = self._scratch_work(tuple(ids), blocks)
        try:
            self.execute(StepInput(step_id=-1, seqs=(work,)))
        finally:
            self.calibrating = False
        self._drop_caches()
        return caches


def _rss_peak_during(fn) -> int:
    """Growth of this process's resident memory at its highest while ``fn`` runs."""
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.001)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], proc.memory_info().rss) - base
