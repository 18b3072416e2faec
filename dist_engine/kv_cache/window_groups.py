"""Block tables of the sliding-window groups beside the primary one, in plain Python.

A model mixing full-attention and sliding-window layers (Gemma) keeps the window layers' K/V in
blocks of their own: every sequence has one table per window group, block ids of that group's
``BlockManager``, positions aligned with the primary table. As the sequence moves on, the blocks
wholly behind a group's window go back (their ids stay in the table, never read again: the
attention mask starts past them). Blocks are hashed with the primary chain's digests, so a
prefix-cache hit of ``H`` tokens also finds the window blocks its next queries read, those of
``[H - window + 1, H)``; a hit is cut back until every group holds them.
"""

from __future__ import annotations

from dist_engine.kv_cache.block_manager import BlockManager

PLACEHOLDER = 0  # a table entry behind the window (never read; block 0 always holds finite K/V)


class WindowGroups:
    def __init__(self, managers: dict[str, BlockManager], windows: dict[str, int]) -> None:
        self.managers, self.windows = managers, windows
        self.block_size = next(iter(managers.values())).block_size

    def tables(self, seq) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(seq.group_tables.get(g, ())) for g in self.managers)

    def _first_needed(self, group: str, position: int) -> int:
        """The first block a query at ``position`` (or later) reads in ``group``."""
        return max(0, position - self.windows[group] + 1) // self.block_size

    def grow(self, seq, num_tokens: int) -> bool:
        """Every group's table holds ``num_tokens``; all or nothing."""
        grown = []
        for g, bm in self.managers.items():
            table = seq.group_tables.setdefault(g, [])
            before = len(table)
            if not bm.grow(table, num_tokens):
                for g2, n in grown:  # undo the groups already grown
                    self.managers[g2].free_blocks(seq.group_tables[g2][n:])
                    del seq.group_tables[g2][n:]
                return False
            grown.append((g, before))
        return True

    def free(self, seq) -> None:
        for g, bm in self.managers.items():
            table = seq.group_tables.pop(g, [])
            bm.free_blocks(table[seq.group_freed.pop(g, 0):])

    def free_behind_window(self, seq) -> None:
        for g, bm in self.managers.items():
            behind = min(self._first_needed(g, seq.num_computed), len(seq.group_tables.get(g, ())))
            freed = seq.group_freed.get(g, 0)
            if behind > freed:
                bm.free_blocks(seq.group_tables[g][freed:behind])
                seq.group_freed[g] = behind

    def share_from(self, seq, lead, num_blocks: int) -> None:
        """An ``n > 1`` completion shares the leader's first ``num_blocks`` blocks (those still
        held; the ones behind the window are placeholders)."""
        for g, bm in self.managers.items():
            table = lead.group_tables.get(g, [])
            gone = min(lead.group_freed.get(g, 0), num_blocks)
            seq.group_tables[g] = [PLACEHOLDER] * gone + bm.share(table[gone:num_blocks])
            seq.group_freed[g] = gone

    def servable(self, seq, num_blocks: int) -> int:
        """The most of a prefix-cache hit of ``num_blocks`` primary blocks every group can
        serve: its window blocks before the hit's end are cached."""
        while num_blocks and not all(
                bm.cached.get(d) is not None
                for g, bm in self.managers.items()
                for d in seq.block_hashes[self._first_needed(g, num_blocks * self.block_size):num_blocks]):
            num_blocks -= 1
        return num_blocks

    def take(self, seq, num_blocks: int) -> None:
        """References on the window blocks of a hit of ``num_blocks`` (``servable``)."""
        for g, bm in self.managers.items():
            lo = self._first_needed(g, num_blocks * self.block_size)
            ids = [bm.cached[d] for d in seq.block_hashes[lo:num_blocks]]
            seq.group_tables[g] = [PLACEHOLDER] * lo + bm.share(ids)
            seq.group_freed[g] = lo

    def commit(self, seq) -> None:
        """Mark the groups' blocks with the digests the primary chain has given their positions."""
        for g, bm in self.managers.items():
            table, freed = seq.group_tables.get(g, []), seq.group_freed.get(g, 0)
            done = seq.group_hashed.get(g, freed)
            for b in range(max(done, freed), min(len(seq.block_hashes), len(table))):
                bm.mark(table[b], seq.block_hashes[b])
            seq.group_hashed[g] = max(done, len(seq.block_hashes))
