"""Per-sequence state held by the scheduler (plain Python)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dist_engine.engine.detokenizer import IncrementalDetokenizer
from dist_engine.engine.outputs import RequestMetrics
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.kv_cache.block_manager import Digest, namespace_digest
from dist_engine.worker.messages import SamplingSpec

NO_MTP_CACHE = "without-mtp-cache"


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int  # completion index within its request (n > 1)
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # effective sampling seed (the request's, or one drawn at admission)
    detok: IncrementalDetokenizer | None
    metrics: RequestMetrics
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""  # output text released so far (stop strings cut off)
    pending_text: str = ""  # decoded but held back: it may be the start of a stop string
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    banned_until_min: tuple[int, ...] = ()  # stop/EOS ids masked while under min_tokens
    leader: Sequence | None = None  # n > 1: completion 0, whose prompt blocks this one shares
    draft_token_ids: list[int] = field(default_factory=list)  # proposed last step, unverified
    # with an MTP layer: whether this sequence drafts and keeps the layer's cache; decided when
    # it is first admitted (None before), kept over preemption
    speculate: bool | None = None
    hidden_chunks: list = field(default_factory=list)  # [n, H] tensors of consecutive positions
    # prefix-cache namespace of the request (vLLM's ``cache_salt``): only sequences with the
    # same salt share cached blocks; None shares with every unsalted request
    cache_salt: str | None = None
    # SamplingParams.prompt_logprobs: position p -> {id: logprob} of prompt token p (p >= 1)
    prompt_logprobs: dict[int, dict[int, float]] = field(default_factory=dict)
    grammar: str | None = None  # structured output's llguidance grammar
    # recurrent layers (engine/state_keeper.py): the live state slot; a checkpoint to restore
    # into it at the next step; checkpoint saves reserved as (position, slot); for the leader
    # of an n > 1 request, its fork checkpoint (position, slot) and how many completions have
    # yet to fork from it; for the others, whether they have
    state_slot: int | None = None
    restore_from: int | None = None
    pending_saves: list[tuple[int, int]] = field(default_factory=list)
    fork: tuple[int, int] | None = None
    fork_waiting: int = 0
    forked: bool = False
    # sliding-window models: leading blocks already given back (their ids stay in the table,
    # never read again: every query's window starts past them)
    window_freed: int = 0
    # the other paged groups (sliding-window layers beside full attention): tables, blocks
    # given back behind the window, blocks marked with their digest (kv_cache/window_groups.py)
    group_tables: dict[str, list[int]] = field(default_factory=dict)
    group_freed: dict[str, int] = field(default_factory=dict)
    group_hashed: dict[str, int] = field(default_factory=dict)
    _sent_text: int = 0
    _sent_tokens: int = 0
    _prompt_set: tuple[int, ...] | None = None  # distinct prompt ids (penalties only)
    _counts: dict[int, int] = field(default_factory=dict)  # generated id -> occurrences
    _counted: int = 0
    _root: tuple | None = None  # (namespace key, its digest)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def cache_root(self) -> Digest:
        """Root of this sequence's prefix-cache hash chain: its request's ``cache_salt``, and
        whether its blocks hold the MTP layer's K/V (a sequence the MTP layer skipped lacks it,
        so only such sequences may share its blocks)."""
        key = (self.cache_salt, self.speculate is False)
        if self._root is None or self._root[0] != key:  # decided once at admission
            self._root = (key, namespace_digest(self.cache_salt, NO_MTP_CACHE if key[1] else None))
        return self._root[1]

    @property
    def finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def sampling_spec(self) -> SamplingSpec:
        p = self.params
        banned = self.banned_until_min if len(self.output_token_ids) < p.min_tokens else ()
        penalties = {}
        if p.has_penalties:
            if self._prompt_set is None and p.repetition_penalty != 1.0:
                self._prompt_set = tuple(sorted(set(self.prompt_token_ids)))
            for tok in self.output_token_ids[self._counted:]:
                self._counts[tok] = self._counts.get(tok, 0) + 1
            self._counted = len(self.output_token_ids)
            penalties = dict(repetition_penalty=p.repetition_penalty,
                             presence_penalty=p.presence_penalty,
                             frequency_penalty=p.frequency_penalty,
                             prompt_ids=self._prompt_set or (),
                             output_counts=tuple(self._counts.items()))
        return SamplingSpec(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                            min_p=p.min_p, seed=self.seed, seeded=p.seed is not None, logprobs=p.logprobs or 0,
                            banned_token_ids=banned,
                            banned_for=max(1, p.min_tokens - len(self.output_token_ids)),
                            logit_bias=tuple(sorted(p.logit_bias.items())),
                            grammar=self.grammar, **penalties)

    def hidden_states(self):
        """``[P, H]``: the final-norm hidden state of positions 0..P-1, every position whose
        token was fed (all but the last token). Steps send contiguous rows from the first
        uncomputed position on, and a preemption drops them all, so the rows simply join; an
        aborted request gets the prefix it ran."""
        import torch

        if not self.hidden_chunks:
            return None
        return torch.cat(self.hidden_chunks)[: self.num_tokens - 1]

    def take_text_delta(self) -> str:
        delta = self.text[self._sent_text:]
        self._sent_text = len(self.text)
        return delta

    def take_token_delta(self) -> list[int]:
        delta = self.output_token_ids[self._sent_tokens:]
        self._sent_tokens = len(self.output_token_ids)
        return delta
