"""One MoE layer's routed experts served from the expert cache.

Per step the layer routes first, then gathers the experts its tokens picked on this rank: the
resident ones (and those a prefetch is already loading) are pinned, the missing ones start
loading at once, and with everything requested the layer applies the next MoE layer's router to
its own input and starts loading the experts that one will likely pick, so those reads overlap
this layer's products and the next layer's attention. Experts then run as they become ready
(hits first), each over all of its tokens in one product; when a step needs more experts than
the cache has slots, the rest load into the slots freed as experts finish (waves).

The sum over experts is taken in ascending expert id once all are done, the order the resident
layer adds them in, so paged and resident output are bitwise the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dist_engine.layers.moe import add_in_order, expert_output

if TYPE_CHECKING:
    from dist_engine.experts.cache import ExpertCache
    from dist_engine.experts.slots import Slot


class PagedLayer:
    def __init__(self, cache: ExpertCache, prefix: str, layer: int, expert_range: tuple[int, int],
                 router: nn.Module) -> None:
        self.cache = cache
        self.prefix = prefix  # checkpoint names of its experts: f"{prefix}{e}.gate_proj.weight"
        self.layer = layer
        self.expert_range = expert_range  # this rank's experts: [first, first + count)
        self.router = router
        self.next: PagedLayer | None = None  # the MoE layer after this one (prefetch target)
        self.counts_tokens = False  # the first layer counts the tokens of each forward
        self.hits = self.misses = 0  # this layer's share of the cache's lookups

    def _local(self, ids: torch.Tensor) -> list[int]:
        first, count = self.expert_range
        return [e for e in torch.unique(ids).tolist() if first <= e < first + count]

    def run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, token_ids: torch.Tensor | None = None,
            router_input: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's share of the routed experts' output ``[T, hidden]`` for x ``[T, hidden]``
        and routing weights, ids ``[T, k]``. The next layer's prefetch routes ``router_input``
        (default x; Gemma 4 routes the residual stream, not the experts' normed input) or, for a
        hash-routed next layer, looks ``token_ids`` ``[T]`` up."""
        cache = self.cache
        needed = self._local(ids)  # ascending
        if cache.dry:
            stand_in = cache.slots[0].module
            return add_in_order(x, {e: expert_output(stand_in, x, weights, ids, e) for e in needed})
        if self.counts_tokens:
            cache.tokens += x.shape[0]
        cache.settle_prefetches(self.prefix, set(needed))
        held: dict[int, Slot] = {}
        missing = []
        for e in needed:
            slot = cache.claim((self.prefix, e))
            if slot is None:
                missing.append(e)
            else:
                held[e] = slot
        cache.hits += len(held)
        cache.misses += len(missing)
        self.hits += len(held)
        self.misses += len(missing)
        missing = self._start(missing, held)
        if not missing and self.next is not None and cache.config.prefetch:
            self.next.prefetch(x if router_input is None else router_input, token_ids)
        parts = {}
        while held or missing:
            if held:
                e = min(held, key=lambda k: (not held[k].ready, held[k].seq))  # ready first, then FIFO
                slot = held.pop(e)
                cache.wait(slot)
                parts[e] = expert_output(slot.module, x, weights, ids, e)
                cache.release(slot)
            else:  # every slot is loading something else: wait for one
                cache.wait_any_load()
            missing = self._start(missing, held)
        return add_in_order(x, parts)

    def _start(self, missing: list[int], held: dict) -> list[int]:
        """Start loads for ``missing`` while slots allow; the ones left wait for a later wave."""
        for i, e in enumerate(missing):
            slot = self.cache.start_load((self.prefix, e))
            if slot is None:
                return missing[i:]
            held[e] = slot
        return []

    def predict(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The experts ``[T, k]`` this layer will likely pick: a hash-routed layer's exactly,
        from its table of the token ids (DeepSeek-V4's first layers); otherwise its router
        applied early to ``x`` (the previous layer's input). None when neither is possible."""
        table = getattr(self.router, "tid2eid", None)
        if table is not None:
            return None if token_ids is None else table[token_ids]
        return self.router(x)[1]

    @torch.inference_mode()
    def prefetch(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
        """Start loading the experts this layer will pick for ``x`` ``[T, hidden]`` (the
        previous layer's input) and ``token_ids``, most-picked first, into slots nothing else
        protects."""
        ids = self.predict(x, token_ids)
        if ids is None:
            return
        first, count = self.expert_range
        local = ids[(ids >= first) & (ids < first + count)]
        picked, votes = torch.unique(local, return_counts=True)
        for e in picked[torch.argsort(votes, descending=True, stable=True)].tolist():
            if (self.prefix, e) not in self.cache.where and self.cache.start_load((self.prefix, e), True) is None:
                break
