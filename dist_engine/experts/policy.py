"""Which cached expert to evict: least recently used, or least frequently used with exponential
decay (each use counts ``2^(t / half_life)``, so a use ``half_life`` touches ago counts half as
much as one now). LFU remembers the counts of evicted experts too (there are only so many
experts): when the cache is smaller than what one pass over the layers touches, no expert stays
long enough to be used twice, and a count that restarted at every load would never tell a
popular expert from a rare one.

Both keep a priority per cached key in a heap with lazy deletion (a touch pushes a new entry;
stale ones are skipped when popped), so a touch and an eviction cost O(log n) whatever the number
of slots. LRU's priority is the time of last use; LFU's is the decayed use count. Growing the
weight of new uses instead of shrinking old counts keeps every priority's order, so nothing is
rescanned but a rare renormalisation before the weights overflow.

Decode walks the layers in a cycle, and when the cache is smaller than the experts one cycle
touches, LRU evicts exactly the experts the coming layers need; the decayed count keeps the
experts routing favours across tokens and still lets a once-hot expert age out.
``bench/bench_expert_cache.py`` measures the two.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable

RENORMALISE_AT = 2.0 ** 512  # weights are rescaled before they approach float overflow


class EvictionPolicy:
    def __init__(self, kind: str, half_life: int = 256) -> None:
        """``half_life``: LFU's decay, in touches."""
        if kind not in ("lru", "lfu"):
            raise ValueError(f"eviction policy must be 'lru' or 'lfu', got {kind!r}")
        self.kind = kind
        self.half_life = max(1, half_life)
        self.priority: dict[Hashable, float] = {}  # cached keys
        self.count: dict[Hashable, float] = {}  # LFU: decayed use counts of every key seen
        self.heap: list[tuple[float, int, Hashable]] = []
        self.clock = 0
        self.weight = 1.0  # LFU: what a use counts now (2^(clock / half_life), rescaled)

    def touch(self, key: Hashable) -> None:
        """``key`` was used (or loaded) now."""
        self.clock += 1
        if self.kind == "lru":
            p = float(self.clock)
        else:
            self.weight *= 2.0 ** (1.0 / self.half_life)
            if self.weight > RENORMALISE_AT:
                self._rescale(1.0 / self.weight)
            p = self.count[key] = self.count.get(key, 0.0) + self.weight
        self._set(key, p)

    def demote(self, key: Hashable) -> None:
        """``key`` was loaded for a use that did not come (a wrong prefetch): evict it first."""
        if key in self.priority:
            self.count[key] = 0.0
            self._set(key, 0.0)

    def forget(self, key: Hashable) -> None:
        """``key`` left the cache."""
        self.priority.pop(key, None)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        """The lowest-priority key that ``evictable`` allows (removed from the policy), or None."""
        skipped, found = [], None
        while self.heap:
            entry = heapq.heappop(self.heap)
            p, _, key = entry
            if self.priority.get(key) != p:
                continue  # stale: touched again since, or gone
            if not evictable(key):
                skipped.append(entry)
                continue
            found = key
            break
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        if found is not None:
            self.forget(found)
        return found

    def _set(self, key: Hashable, p: float) -> None:
        self.priority[key] = p
        heapq.heappush(self.heap, (p, self.clock, key))
        if len(self.heap) > 4 * len(self.priority) + 64:  # drop stale entries now and then
            self.heap = [e for e in self.heap if self.priority.get(e[2]) == e[0]]
            heapq.heapify(self.heap)

    def _rescale(self, factor: float) -> None:
        self.weight *= factor
        self.count = {k: c * factor for k, c in self.count.items()}
        self.priority = {k: p * factor for k, p in self.priority.items()}
        self.heap = [(p, self.clock, k) for k, p in self.priority.items()]
        heapq.heapify(self.heap)
