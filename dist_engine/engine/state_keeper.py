"""The scheduler's side of recurrent state (models with Gated DeltaNet layers), plain Python.

Every running sequence holds a live state slot. Prefill chunks end on the kinds' grid and at
checkpoint positions (``ChunkGrid``), where the step saves the state into a checkpoint slot.
A prefix-cache hit resumes from the latest checkpoint at or before its cached blocks: blocks
past it are given back and recomputed, so a resumed prefill runs exactly the chunks an
uninterrupted one runs. The completions of an ``n > 1`` request fork from the leader's state at
the last grid position before its final prompt token, saved for them in a private checkpoint.
"""

from __future__ import annotations

from dist_engine.engine.sequence import Sequence
from dist_engine.kv_cache.block_manager import BlockManager
from dist_engine.kv_cache.state_slots import ChunkGrid, StateCheckpoints, StateSlots


class StateKeeper:
    def __init__(self, num_slots: int, num_checkpoints: int, interval: int, blocks: BlockManager,
                 grid: int) -> None:
        self.slots = StateSlots(num_slots)
        self.checkpoints = StateCheckpoints(num_checkpoints, interval)
        # Prefill chunks end on checkpoint positions whether or not checkpoints are saved: a
        # step's chunking decides the last bits of the attention layers' output, so with the
        # same chunks prefix caching on computes bitwise what it computes off. Checkpoints at
        # prefix positions only serve prefix caching; forks use the slots regardless.
        self.grid = ChunkGrid(interval, grid)
        self.saving = blocks.prefix_caching and num_checkpoints > 0
        self.blocks = blocks
        self.fork_unit = max(grid, blocks.block_size)

    # ---- admission ---------------------------------------------------------------------------
    def admit(self, seq: Sequence) -> bool:
        """A live slot for ``seq`` (False: none free, it waits)."""
        if seq.state_slot is None:
            seq.state_slot = self.slots.take()
        return seq.state_slot is not None

    def fork_point(self, seq: Sequence) -> int:
        """Where the completions of ``seq``'s request fork (0: no fork)."""
        if seq.params.n == 1 or seq.leader is not None or not self.checkpoints.num:
            return 0
        return (len(seq.prompt_token_ids) - 1) // self.fork_unit * self.fork_unit

    def attach_fork(self, seq: Sequence) -> None:
        """A completion after the first (its leader running) resumes from the leader's fork
        checkpoint, sharing the leader's blocks before it; without one it computes its own
        prompt."""
        lead = seq.leader
        if lead.fork is None:
            return
        pos, slot = lead.fork
        k = pos // self.blocks.block_size
        seq.block_table.extend(self.blocks.share(lead.block_table[:k]))
        seq.block_hashes.extend(lead.block_hashes[:k])
        seq.restore_from = slot

    def unadmit(self, seq: Sequence) -> None:
        """``seq`` could not get its blocks and waits again: its slot goes back meanwhile."""
        if seq.state_slot is not None:
            self.slots.free(seq.state_slot)
            seq.state_slot = None
        seq.restore_from = None

    def attach_prefix(self, seq: Sequence) -> None:
        """After ``match_prefix`` gave ``seq`` its cached blocks: resume from the latest
        checkpoint they cover, giving back the blocks past it."""
        bs, stop = self.blocks.block_size, 0
        for pos in reversed(self.grid.positions(0, len(seq.block_table) * bs)):
            slot = self.checkpoints.find(seq.block_hashes[pos // bs - 1])
            if slot is not None:
                stop, seq.restore_from = pos, slot
                self.checkpoints.hits += 1
                break
        keep = stop // bs
        self.blocks.prefix_hit_tokens -= (len(seq.block_table) - keep) * bs
        self.blocks.free_blocks(seq.block_table[keep:])
        del seq.block_table[keep:], seq.block_hashes[keep:]
        seq.restore_from = seq.restore_from if stop else None

    # ---- each step ---------------------------------------------------------------------------
    def chunk(self, seq: Sequence, num_new: int) -> int:
        """Tokens ``seq`` may feed this step out of ``num_new``: prefill chunks end on the grid."""
        start = seq.num_computed
        if start + num_new == seq.num_tokens and start + 1 == seq.num_tokens:
            return num_new  # decoding: one token (and drafts) per step
        fork = self.fork_point(seq)
        stops = (fork,) if fork and seq.fork is None else ()
        return self.grid.chunk_end(start, start + num_new, seq.num_tokens, stops) - start

    def saves(self, seq: Sequence, reach: int) -> tuple[tuple[int, int], ...]:
        """Checkpoints to save this step, up to position ``reach`` (drafts included; a save
        past what verification accepts is not made). Slots are reserved now."""
        start = seq.num_computed
        wanted = [p for p in self.grid.positions(start, reach) if self.saving
                  and p not in {q for q, _ in seq.pending_saves}]
        fork = self.fork_point(seq)
        if fork and seq.fork is None and start < fork <= reach:
            wanted.append(fork)
        for pos in sorted(set(wanted)):
            slot = self.checkpoints.reserve()
            if slot is None:
                break
            seq.pending_saves.append((pos, slot))
        return tuple((p, s) for p, s in seq.pending_saves if start < p <= reach)

    def after_step(self, seq: Sequence) -> None:
        """Commit the saves ``seq`` has now verified and whose block digests are known."""
        lead = seq.leader
        if seq.restore_from is not None and lead is not None and not seq.forked:
            seq.forked = True  # its first step restored the leader's fork
            self._fork_taken(lead)
        seq.restore_from = None
        bs, fork = self.blocks.block_size, self.fork_point(seq)
        for pos, slot in list(seq.pending_saves):
            if pos > seq.num_computed:
                continue
            if pos == fork and seq.fork is None:
                seq.fork = (pos, slot)  # kept private until every completion has forked
            elif len(seq.block_hashes) >= pos // bs:
                self.checkpoints.commit(slot, seq.block_hashes[pos // bs - 1])
            else:
                continue  # its digest needs the token after the block (MTP models): next step
            seq.pending_saves.remove((pos, slot))

    def release(self, seq: Sequence, finished: bool) -> None:
        """``seq`` was preempted or finished: its live slot, its unsaved reservations and a
        fork it saved go back (completions that have not forked yet compute their prompt)."""
        self.unadmit(seq)
        for _, slot in seq.pending_saves:
            self.checkpoints.release(slot)
        seq.pending_saves.clear()
        if seq.fork is not None:
            self.checkpoints.release(seq.fork[1])
            seq.fork = None
        if finished and seq.leader is not None and not seq.forked:  # it never took the fork
            seq.forked = True
            self._fork_taken(seq.leader)

    def _fork_taken(self, lead: Sequence) -> None:
        """One more completion has forked from (or will never take) ``lead``'s fork."""
        lead.fork_waiting -= 1
        if lead.fork_waiting == 0 and lead.fork is not None:
            self.checkpoints.release(lead.fork[1])
            lead.fork = None
