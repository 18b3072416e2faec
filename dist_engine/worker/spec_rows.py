"""The vocabulary of one speculative step, per sequence, as plain data.

A decoding sequence feeds its last verified token and the ``drafts`` proposed last step; each
of those rows is sampled exactly as plain decoding would sample it (``VerifyRows``). Drafts are
*accepted* while they equal the verifier's draws (or pass the rejection test); the row after the
last accepted draft emits one more token: the *bonus* (all accepted) or the *recovered* token
(the verifier's draw, or the residual's, where a draft was rejected). The MTP layer then
*catches up* on every verified position and chains itself to *propose* the next drafts
(``CatchUp``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dist_engine.worker.batch import ForwardBatch
from dist_engine.worker.messages import SampledTokens, SamplingSpec, SeqWork, StepInput
from dist_engine.worker.rejection import PendingDrafts
from dist_engine.worker.sampler import gumbel_noise


def row_spec(spec: SamplingSpec, drafts: tuple[int, ...]) -> SamplingSpec:
    """The spec for the token after ``drafts`` (assumed accepted): penalties count them, the
    min-tokens ban covers only the first ``banned_for`` tokens."""
    j = len(drafts)
    if j == 0:
        return spec
    changes = {}
    if spec.banned_token_ids and j >= spec.banned_for:
        changes["banned_token_ids"] = ()
    if spec.repetition_penalty != 1.0 or spec.presence_penalty or spec.frequency_penalty:
        counts = dict(spec.output_counts)
        for t in drafts:
            counts[t] = counts.get(t, 0) + 1
        changes["output_counts"] = tuple(counts.items())
    return replace(spec, **changes) if changes else spec


def accept_drafts(drafts: tuple[int, ...], targets: list[int]) -> int:
    """How many leading drafts equal the tokens the verifier drew at their positions."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return a


def pick_draft(logits: torch.Tensor, spec: SamplingSpec, position: int, vocab_size: int,
               ids: torch.Tensor | None = None) -> int:
    """A draft from draft logits ``[V']`` (over token ids ``ids``; None: the full vocabulary):
    greedy, or the Gumbel-max draw with the noise the verifier uses at ``position``."""
    if spec.temperature == 0.0:
        k = int(torch.argmax(logits))
    else:
        g = gumbel_noise(spec.seed, position, vocab_size).to(logits.device)
        k = int(torch.argmax(logits / spec.temperature + (g if ids is None else g[ids])))
    return k if ids is None else int(ids[k])


@dataclass(frozen=True)
class VerifyRows:
    """The rows one sampling sequence feeds the verifier this step: its last verified token and
    the drafts after it (``drafts``), each sampled under ``specs`` at ``positions``."""

    seq: SeqWork
    drafts: tuple[int, ...]
    specs: tuple[SamplingSpec, ...]  # row j: the spec with drafts[:j] as context
    positions: tuple[int, ...]  # position of the token drawn at row j
    # the drafts' distributions when they are verified by rejection sampling (None: Gumbel)
    pending: PendingDrafts | None

    @classmethod
    def of(cls, s: SeqWork, pending: PendingDrafts | None) -> VerifyRows:
        k = s.num_drafts
        drafts = s.token_ids[len(s.token_ids) - k:]
        first = s.context_len - k  # position drawn at row 0
        if pending is not None and not (k and pending.matches(drafts, first)):
            pending = None  # drafts this worker did not draw this way: the Gumbel scheme
        return cls(s, drafts, tuple(row_spec(s.sampling, drafts[:j]) for j in range(k + 1)),
                   tuple(range(first, first + k + 1)), pending)

    def draw_specs(self) -> list[SamplingSpec]:
        """What each row draws with. Under rejection sampling a draft row's own draw is never
        emitted (the draft is accepted or replaced by the residual's draw), so those rows are
        drawn greedily and only the bonus row pays for Gumbel noise."""
        if self.pending is None:
            return list(self.specs)
        return [replace(sp, temperature=0.0) for sp in self.specs[:-1]] + [self.specs[-1]]


@dataclass(frozen=True)
class CatchUp:
    """The MTP layer's work for one sequence this step: slot p reads the main model's hidden
    state of p (``rows`` of the main pass) and token p + 1 (``work``), for every position the
    step verified; then ``propose`` drafts chained from its last position ``last_pos``."""

    work: SeqWork
    rows: range
    propose: int
    last_pos: int


def catch_up_plans(step: StepInput, batch: ForwardBatch,
                   sampled: dict[int, SampledTokens]) -> list[CatchUp]:
    """One ``CatchUp`` per sequence whose MTP cache is kept (``SeqWork.mtp``): a sampling
    sequence covers its verified tokens (the token after the last one is the sampled bonus); a
    prefill chunk that does not sample covers its tokens (the next prompt token is known)."""
    plans = []
    for s, start in zip(step.seqs, batch.starts):
        if not s.mtp:  # runs without speculation: its MTP cache is never read
            continue
        base = len(s.token_ids) - s.num_drafts
        if s.sample:
            got = sampled[s.seq_id].token_ids
            m = base + len(got) - 1  # fed tokens now verified
            toks = s.token_ids[1:m] + (got[-1],)
        elif s.next_token is not None:
            m, toks = base, s.token_ids[1:] + (s.next_token,)
        else:
            continue
        propose = s.propose if s.sample else 0
        work = SeqWork(s.seq_id, toks, s.start_pos, s.block_table, propose > 0, s.sampling,
                       group_tables=s.group_tables)  # no recurrent state: the MTP layer is attention
        plans.append(CatchUp(work, range(start, start + m), propose, s.start_pos + m - 1))
    return plans
