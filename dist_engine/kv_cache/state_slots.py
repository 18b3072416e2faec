"""Recurrent-state bookkeeping on the driver, in plain Python: live slots and checkpoints.

A model with recurrent layers (Gated DeltaNet) keeps one fixed-size state per running
sequence. ``StateSlots`` hands out the live slots (their number bounds concurrency).
``StateCheckpoints`` keeps copies of states at fixed positions (every ``interval`` tokens) of
prompts seen before, keyed by the prefix-cache digest of the blocks up to that position, so
that a later request with the same prefix resumes from the nearest checkpoint at or before its
cached blocks instead of recomputing its whole prompt; least recently used ones are evicted. A
checkpoint slot is *reserved* when a step is asked to save into it and *committed* once the
sequence has verified that far and its blocks' digests are known.

``ChunkGrid`` is where prefill chunks of such models may end: on multiples of the kinds' grid
(``RecurrentState.grid``: the delta rule's 64-token chunk, so a chunk of the chunked form never
straddles two steps; 1 for a state that any chunking computes alike) and never past the next
checkpoint position (a checkpoint is the state at the end of a step's chunk).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from dist_engine.kv_cache.block_manager import Digest

DELTA_CHUNK = 64  # the chunked delta rule's chunk: a Gated DeltaNet state's grid


class StateSlots:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise RuntimeError(f"state slot {slot} freed twice or never taken")
        self._free.append(slot)


class StateCheckpoints:
    """``num`` checkpoint slots; ``interval`` tokens between checkpoint positions."""

    def __init__(self, num: int, interval: int) -> None:
        self.num, self.interval = num, interval
        self._idle: OrderedDict[int, Digest | None] = OrderedDict((c, None) for c in range(num))
        self._by_digest: dict[Digest, int] = {}
        self._busy: set[int] = set()  # reserved for a save, or pinned by a fork
        self.hits = self.saves = 0

    def find(self, digest: Digest) -> int | None:
        """The checkpoint saved under ``digest`` (marked recently used), or None."""
        slot = self._by_digest.get(digest)
        if slot is not None and slot in self._idle:
            self._idle.move_to_end(slot)
        return slot

    def reserve(self) -> int | None:
        """A slot to save into, evicting the least recently used checkpoint; None if every
        slot is busy."""
        if not self._idle:
            return None
        slot, digest = self._idle.popitem(last=False)
        if digest is not None:
            del self._by_digest[digest]
        self._busy.add(slot)
        return slot

    def commit(self, slot: int, digest: Digest | None) -> None:
        """The save into ``slot`` happened: keep it under ``digest`` (None: a private copy now
        unused, e.g. a fork's). An older checkpoint of the same digest is dropped."""
        self._busy.discard(slot)
        if digest is not None:
            old = self._by_digest.pop(digest, None)
            if old is not None and old != slot and old in self._idle:
                self._idle[old] = None
                self._idle.move_to_end(old, last=False)
            self._by_digest[digest] = slot
            self.saves += 1
        self._idle[slot] = digest

    def release(self, slot: int) -> None:
        """A reserved slot whose save never happened (the sequence ended or was preempted)."""
        self.commit(slot, None)
        self._idle.move_to_end(slot, last=False)

    @property
    def num_cached(self) -> int:
        return len(self._by_digest)


@dataclass(frozen=True)
class ChunkGrid:
    interval: int  # checkpoint positions are multiples of this (0: no checkpoints)
    grid: int = DELTA_CHUNK  # chunk ends sit on multiples of this (the kinds' grid)

    def chunk_end(self, start: int, end: int, total: int, stops: tuple[int, ...] = ()) -> int:
        """Where a chunk from ``start`` that could reach ``end`` (of ``total`` tokens) ends: not
        past the next checkpoint position or any of ``stops`` (a fork point), and on a
        multiple of the grid unless it reaches ``total``. ``start`` when nothing fits."""
        bounds = [p for p in stops if start < p]
        if self.interval:
            bounds.append((start // self.interval + 1) * self.interval)
        end = min([end, *bounds])
        if end >= total:
            return total
        return max(start, end - end % self.grid)

    def positions(self, start: int, end: int) -> list[int]:
        """Checkpoint positions in ``(start, end]``."""
        if not self.interval:
            return []
        first = (start // self.interval + 1) * self.interval
        return list(range(first, end + 1, self.interval))
