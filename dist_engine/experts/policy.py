"""Which cached expert to evict: least recently used, or least frequently used with dynamic
ageing (LFU-DA).

Both keep a priority per cached key in a heap with lazy deletion (a touch pushes a new entry;
stale ones are skipped when popped), so a touch and an eviction cost O(log n) whatever the
number of slots. LRU's priority is the time of last use. LFU-DA's is ``uses + L``, where L is
the priority of the last evicted key: a newcomer starts just above what was evicted, so experts
that were hot long ago age out instead of holding their slots forever (plain LFU's failure).

Decode walks the layers in a cycle, and when the cache is smaller than the experts one cycle
touches, LRU evicts exactly the experts of the layers coming next; LFU keeps the experts that
routing favours across tokens. ``bench/bench_expert_cache.py`` measures the two.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable


class EvictionPolicy:
    def __init__(self, kind: str) -> None:
        if kind not in ("lru", "lfu"):
            raise ValueError(f"eviction policy must be 'lru' or 'lfu', got {kind!r}")
        self.kind = kind
        self.priority: dict[Hashable, float] = {}
        self.uses: dict[Hashable, int] = {}
        self.heap: list[tuple[float, int, Hashable]] = []
        self.clock = 0
        self.age = 0.0  # LFU-DA's L

    def touch(self, key: Hashable) -> None:
        """``key`` was used (or loaded) now."""
        self.clock += 1
        if self.kind == "lru":
            p = float(self.clock)
        else:
            self.uses[key] = self.uses.get(key, 0) + 1
            p = self.age + self.uses[key]
        self.priority[key] = p
        heapq.heappush(self.heap, (p, self.clock, key))
        if len(self.heap) > 4 * len(self.priority) + 64:  # drop stale entries now and then
            self.heap = [(p, c, k) for p, c, k in self.heap if self.priority.get(k) == p]
            heapq.heapify(self.heap)

    def demote(self, key: Hashable) -> None:
        """``key`` was loaded for a use that did not come (a wrong prefetch): evict it first."""
        if key in self.priority:
            p = 0.0 if self.kind == "lru" else self.age
            self.uses[key] = 0
            self.priority[key] = p
            heapq.heappush(self.heap, (p, self.clock, key))

    def forget(self, key: Hashable) -> None:
        """``key`` left the cache without being chosen as a victim (a cancelled load)."""
        self.priority.pop(key, None)
        self.uses.pop(key, None)

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
            if self.kind == "lfu":
                self.age = self.priority[found]
            self.forget(found)
        return found
