"""Continuous-batching scheduler: which sequences run this step, and how many tokens each feeds.

Each step, running sequences go first (FCFS), each feeding its next prefill chunk or its last
sampled token, within ``max_num_batched_tokens``; then waiting sequences are admitted (prefix
cache hits skip their cached blocks) while tokens, sequence slots and blocks remain. When blocks
run out for a running sequence, the newest running sequence is preempted: its blocks are freed
and it waits at the front of the queue to be recomputed (prefix caching makes that cheap).
The completions of an ``n > 1`` request after the first wait until the first has computed the
prompt, then share its full prompt blocks (reference counted, even without prefix caching).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from dist_engine.config import SchedulerConfig
from dist_engine.engine.sequence import SeqStatus, Sequence
from dist_engine.engine.state_keeper import StateKeeper
from dist_engine.kv_cache.block_manager import BlockManager
from dist_engine.kv_cache.window_groups import WindowGroups
from dist_engine.worker.messages import SeqWork


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens fed this step

    @property
    def samples(self) -> bool:  # the fed tokens reach the end of the sequence
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager,
                 speculate_up_to: int | None = None, state: StateKeeper | None = None,
                 window: int | None = None, others: WindowGroups | None = None) -> None:
        self.config = config
        self.blocks = blocks
        self.state = state  # models with recurrent layers: state slots and checkpoints
        # every attention layer sees only this many positions: blocks behind it are given back
        self.window = window
        self.others = others  # sliding-window groups beside full attention (own tables)
        # with an MTP layer: sequences in the engine up to which a newly admitted one speculates
        # (0: always); None: no speculation
        self.speculate_up_to = speculate_up_to
        self.num_without_speculation = 0  # sequences admitted with speculation off
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        if self.state is not None:
            self.state.release(seq, finished=False)
        self._free_table(seq)
        seq.block_hashes.clear()
        seq.draft_token_ids.clear()
        seq.hidden_chunks.clear()  # recomputed from the start
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        # 1. running sequences, oldest first
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue  # preempted while making room for an older one
            num_new = self._chunk(seq, budget)
            if num_new == 0:
                continue  # a prefill chunk would end off the delta rule's grid: next step
            while not self._grow(seq, self._needed(seq, num_new)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SeqStatus.RUNNING:
                continue
            out.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        # 2. admit waiting sequences in arrival order
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if self._wait_for_leader(seq):
                continue
            if seq.speculate is None and self.speculate_up_to is not None:
                seq.speculate = self._may_speculate(seq)
                self.num_without_speculation += not seq.speculate
            if self.state is not None and not self.state.admit(seq):
                break  # every recurrent-state slot is taken
            if not seq.block_table:
                self._attach_prefix(seq)
            num_new = self._chunk(seq, budget)
            if num_new == 0 or not self._grow(seq, self._needed(seq, num_new)):
                # Give back its prefix hits while it waits: held references could starve others.
                self._free_table(seq)
                seq.block_hashes.clear()
                seq.num_computed = 0
                if self.state is not None:
                    self.state.unadmit(seq)
                if num_new == 0:
                    break
                if not self.running:  # nothing will ever free blocks: admission should have caught it
                    raise RuntimeError("KV cache too small for a single sequence")
                break
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Every group's table holds ``num_tokens`` (all or nothing)."""
        before = len(seq.block_table)
        if not self.blocks.grow(seq.block_table, num_tokens):
            return False
        if self.others is not None and not self.others.grow(seq, num_tokens):
            self.blocks.free_blocks(seq.block_table[before:])
            del seq.block_table[before:]
            return False
        return True

    def _free_table(self, seq: Sequence) -> None:
        self.blocks.free_blocks(seq.block_table[seq.window_freed:])
        seq.block_table.clear()
        seq.window_freed = 0
        if self.others is not None:
            self.others.free(seq)

    def free_behind_window(self, seq: Sequence) -> None:
        """Sliding-window models: give back the blocks no later query can see (the next query
        sits at ``num_computed`` and sees keys from ``num_computed - window + 1`` on)."""
        if self.others is not None and not seq.finished:
            self.others.free_behind_window(seq)
        if self.window is None or seq.finished:
            return
        behind = max(0, seq.num_computed - self.window + 1) // self.blocks.block_size
        if behind > seq.window_freed:
            self.blocks.free_blocks(seq.block_table[seq.window_freed:behind])
            seq.window_freed = behind

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens ``seq`` feeds this step within ``budget``."""
        num_new = min(seq.num_tokens - seq.num_computed, budget)
        return num_new if self.state is None else self.state.chunk(seq, num_new)

    def _needed(self, seq: Sequence, num_new: int) -> int:
        """Tokens the block table must hold this step: lookahead slots too if it samples."""
        end = seq.num_computed + num_new
        if end == seq.num_tokens and seq.speculate is not False:
            end = min(end + self.config.num_lookahead_slots, self.config.max_model_len)
        return end

    def _may_speculate(self, seq: Sequence) -> bool:
        """Speculate unless the engine holds more sequences than ``speculate_up_to`` (a batch
        that large gets no drafts, so the MTP layer's upkeep would be pure cost). Completions
        of one request agree: they share the leader's prompt blocks."""
        if seq.leader is not None and seq.leader.speculate is not None:
            return seq.leader.speculate
        limit = self.speculate_up_to
        return not limit or len(self.running) + len(self.waiting) <= limit

    @staticmethod
    def _wait_for_leader(seq: Sequence) -> bool:
        """n > 1: a sibling waits (without holding up others) while its leader fills the prompt."""
        lead = seq.leader
        if lead is None or lead.finished:
            return False
        return lead.status == SeqStatus.WAITING or lead.num_computed < len(lead.prompt_token_ids)

    def _attach_prefix(self, seq: Sequence) -> None:
        """Start from blocks already computed: the leader's prompt blocks, or prefix-cache hits."""
        bs = self.blocks.block_size
        lead = seq.leader
        if seq.params.return_hidden_states or seq.params.prompt_logprobs is not None:
            pass  # every position must run through the model for its hidden state / logprobs
        elif lead is not None and lead.status == SeqStatus.RUNNING:
            if self.state is not None:  # recurrent layers: from the leader's fork checkpoint
                self.state.attach_fork(seq)
            else:  # full prompt blocks only, and never the last prompt token: its logits are needed
                k = (len(seq.prompt_token_ids) - 1) // bs
                gone = min(lead.window_freed, k)  # behind the leader's window: never read again
                seq.block_table.extend(lead.block_table[:gone])
                seq.block_table.extend(self.blocks.share(lead.block_table[gone:k]))
                seq.block_hashes.extend(lead.block_hashes[:k])
                seq.window_freed = gone
                if self.others is not None:
                    self.others.share_from(seq, lead, k)
        else:
            hits, hashes = self.blocks.match_prefix(seq.token_ids, seq.cache_root)
            seq.block_table.extend(hits)
            seq.block_hashes.extend(hashes)
            self._fit_hits(seq)
        seq.num_computed = len(seq.block_table) * bs
        seq.metrics.prefix_hit_tokens = max(seq.metrics.prefix_hit_tokens, seq.num_computed)

    def _fit_hits(self, seq: Sequence) -> None:
        """Cut prefix-cache hits back to what every kind can resume from: window groups need
        the blocks their next queries read, recurrent layers a state checkpoint."""
        n = len(seq.block_table)
        while True:
            if self.others is not None:
                self._trim_hits(seq, self.others.servable(seq, n))
            if self.state is not None:  # the latest state checkpoint the hits cover
                self.state.attach_prefix(seq)
            n = len(seq.block_table)
            if self.others is None or self.others.servable(seq, n) == n:
                break
            seq.restore_from = None  # that checkpoint's window blocks are gone: look earlier
            n -= 1
        if self.others is not None:
            self.others.take(seq, n)

    def _trim_hits(self, seq: Sequence, keep: int) -> None:
        self.blocks.prefix_hit_tokens -= (len(seq.block_table) - keep) * self.blocks.block_size
        self.blocks.free_blocks(seq.block_table[keep:])
        del seq.block_table[keep:], seq.block_hashes[keep:]

    def work(self, s: ScheduledSeq, num_spec: int = 0, num_propose: int | None = None) -> SeqWork:
        """What the workers do for ``s``; with speculation, feed up to ``num_spec`` of its
        pending drafts and ask for up to ``num_propose`` (default ``num_spec``) new ones, within
        the table, the context limit and the tokens the request may still produce."""
        seq = s.seq
        start = seq.num_computed
        tokens = seq.token_ids[start:start + s.num_new]
        drafts, propose, next_token = (), 0, None
        mtp = bool(self.config.num_lookahead_slots) and seq.speculate is not False
        if mtp and s.samples:
            cap = min(len(seq.block_table) * self.blocks.block_size, self.config.max_model_len)
            left = seq.params.max_tokens - len(seq.output_token_ids)  # tokens it may still emit
            k = max(0, min(len(seq.draft_token_ids), num_spec, cap - seq.num_tokens, left - 1))
            drafts = tuple(seq.draft_token_ids[:k])
            want = num_spec if num_propose is None else num_propose
            propose = max(0, min(want, cap - (seq.num_tokens + k) + 1, left - 2))
        elif (mtp or seq.params.prompt_logprobs is not None) and not s.samples:
            # the MTP layer reads one token ahead; so does a prompt logprob
            next_token = seq.token_ids[start + s.num_new]
        state = {}
        if self.state is not None:
            state = dict(state_slot=seq.state_slot, restore_from=seq.restore_from,
                         save_states=self.state.saves(seq, start + s.num_new + len(drafts)))
        if self.others is not None:
            state["group_tables"] = self.others.tables(seq)
        return SeqWork(
            **state,
            seq_id=seq.seq_id,
            token_ids=tuple(tokens) + drafts,
            start_pos=start,
            block_table=tuple(seq.block_table),
            sample=s.samples,
            sampling=seq.sampling_spec(),
            num_drafts=len(drafts),
            propose=propose,
            next_token=next_token,
            mtp=mtp,
            return_hidden=seq.params.return_hidden_states,
            prompt_logprobs=(seq.params.prompt_logprobs if start < len(seq.prompt_token_ids)
                             else None),
        )

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.state is not None:
            self.state.release(seq, finished=True)
        self._free_table(seq)
        seq.block_hashes.clear()
        seq.status = SeqStatus.FINISHED
