"""Speculative decoding on a shard worker, whatever drafts: verify, accept, propose.

A step feeds each decoding sequence its last verified token plus the drafts proposed last step.
The main model's logits at those K + 1 positions are sampled exactly as plain decoding would
sample them (each row with the preceding drafts in its penalty / min-tokens context, Gumbel
noise keyed by the position), and drafts are accepted while they equal the sampled tokens. So
output is identical to plain decoding whatever the drafter proposes; rejected positions' K/V are
simply not counted (the driver advances a sequence by the accepted tokens only, later steps
overwrite the rest). Drafts of seeded requests use the same Gumbel noise as the verifier will
at that position, so a draft is accepted whenever the draft and the target distributions pick
the same token under shared noise. Requests without a seed are verified by rejection sampling
instead (``rejection.py``: same distribution, higher acceptance).

A *method* is what proposes the next drafts in the same call, after verification
(``SpeculativeDecoder.propose_next``): ``mtp`` (the model's MTP layers or a graft,
``spec_decode.py``), ``gemma4_assistant`` (a drafter reading the target's K/V,
``spec_assistant.py``), ``dflash`` (a block-diffusion drafter proposing a whole block in one
forward, ``spec_dflash.py``). Each keeps whatever state it needs; ``chain`` is the draft loop they
share (one draft per sequence per round, under the spec and grammar state the verifier will use
at that position). The driver sees one round trip per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from dist_engine.config import EngineConfig
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.worker.batch import ForwardBatch, hidden_rows
from dist_engine.worker.draft_head import DraftHead
from dist_engine.worker.messages import SampledTokens, SamplingSpec, SeqWork, StepInput, StepOutput
from dist_engine.worker.rejection import PendingDrafts, draw_drafts, target_logits, verify
from dist_engine.worker.sampler import penalise, sample
from dist_engine.worker.spec_rows import VerifyRows, accept_drafts, pick_draft, row_spec


class SpeculativeDecoder:
    """What every method shares: verification, drawing drafts from draft logits, the chain."""

    def __init__(self, runner, config: EngineConfig) -> None:
        self.runner = runner
        self.spec = config.speculative
        self.draft_head: DraftHead | None = None  # a reduced draft vocabulary (MTP grafts)
        # drafts proposed last step for rejection sampling: seq id -> their distributions
        self._pending: dict[int, PendingDrafts] = {}
        self.caches: list[LayerKV] = []  # the caches of ``cache_layers()``, once allocated
        # seconds spent per phase (read by the benchmark to show where the time goes)
        self.seconds = {"verify": 0.0, "mtp_catch_up": 0.0, "draft_chain": 0.0, "main_forward": 0.0}

    def modules(self) -> list[torch.nn.Module]:
        """The method's modules (weights this rank holds beside the model's)."""
        raise NotImplementedError

    def cache_layers(self) -> list[torch.nn.Module]:
        """Layers of the method with a paged cache of their own, allocated after the model's."""
        return []

    def metadata_layers(self) -> list[torch.nn.Module]:
        """The ``cache_layers()`` that attend through the runner's attention metadata."""
        return self.cache_layers()

    def propose_next(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor,
                     prenorm: torch.Tensor | None, sampled: dict[int, SampledTokens]
                     ) -> dict[int, tuple[int, ...]]:
        """After verification: the drafts each proposing sequence feeds next step."""
        raise NotImplementedError

    # ---- one step: verify, propose ---------------------------------------------------------------
    def step(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor,
             prenorm: torch.Tensor | None) -> StepOutput:
        t0 = time.perf_counter()
        sampled = self.verify(batch, hidden)
        self.runner.settle_states(step, batch, sampled)  # rejected drafts leave no state behind
        self.seconds["verify"] += time.perf_counter() - t0
        rows_out = hidden_rows(step, batch, hidden, sampled, self.runner.taps)
        for sid, drafts in self.propose_next(step, batch, hidden, prenorm, sampled).items():
            sampled[sid] = replace(sampled[sid], draft_token_ids=drafts)
        return StepOutput(step.step_id, sampled, rows_out)

    def verify(self, batch: ForwardBatch, hidden: torch.Tensor) -> dict[int, SampledTokens]:
        """Sample every sampling row (the last fed token and each draft) exactly as plain
        decoding would, then accept each sequence's drafts: while they equal the draws (greedy,
        seeded: the Gumbel scheme), or by rejection sampling against the distributions they
        were drawn from (unseeded). Accepted drafts plus one bonus (or residual) token."""
        if not batch.sample_seqs:
            return {}
        logits = self.runner.model.compute_logits(hidden[batch.sample_index])  # [R, vocab] fp32
        pending, self._pending = self._pending, {}
        grammars = self.runner.grammars
        rows = [VerifyRows.of(s, pending.get(s.seq_id) if self._rejects(s.sampling) else None)
                for s in batch.sample_seqs]
        rows = [replace(r, specs=grammars.constrain_rows(r.seq.seq_id, r.specs, r.drafts))
                if r.seq.sampling.grammar is not None else r for r in rows]
        specs = [sp for r in rows for sp in r.specs]
        draw = [sp for r in rows for sp in r.draw_specs()]
        positions = [p for r in rows for p in r.positions]
        tokens, lps, top = sample(logits, draw, positions)
        sampled, row = {}, 0
        for r in rows:
            k = len(r.drafts)
            if r.pending is not None:  # rejection sampling against the kept q
                target = target_logits(logits[row:row + k], specs[row:row + k])
                a, tok = verify(r.pending, r.drafts, target, r.seq.sampling,
                                None if self.draft_head is None else self.draft_head.vocab_ids)
                # accepted drafts, then the residual's draw at the rejected row (all accepted:
                # the verifier's own draw at the last row is the bonus)
                emitted = r.drafts[:a] + ((tok,) if tok is not None else ())
                if emitted:
                    lp = torch.log_softmax(logits[row:row + len(emitted)], -1)
                    for j, t in enumerate(emitted):
                        tokens[row + j], lps[row + j] = t, float(lp[j, t])
            else:  # greedy, seeded, or drafts this worker did not draw: the Gumbel scheme
                a = accept_drafts(r.drafts, tokens[row:row + k])
            end = row + a + 1
            grammars.advance(r.seq.seq_id, tokens[row:end])
            sampled[r.seq.seq_id] = SampledTokens(
                tuple(tokens[row:end]), tuple(lps[row:end]),
                tuple(top[row:end]) if any(top[row:end]) else (), num_drafts=k)
            row += k + 1
        return sampled

    # ---- drafting ----------------------------------------------------------------------------
    def _rejects(self, spec: SamplingSpec) -> bool:
        """Whether this request's drafts are drawn from q and verified by rejection sampling."""
        return spec.temperature != 0.0 and not spec.seeded and self.spec.unseeded_acceptance == "rejection"

    def draft_tokens(self, logits: torch.Tensor, ids: torch.Tensor | None, seqs: list[SeqWork],
                     specs: list[SamplingSpec], positions: list[int]) -> list[int]:
        """Draft tokens at ``positions`` from draft logits ``[N, V']`` (over token ids ``ids``;
        None: the full vocabulary), each row under the spec the verifier will use there
        (``row_spec``: penalties count the tokens before it, the min-tokens ban still on or off),
        so penalised or banned tokens are not drafted only to be rejected. A request verified by
        rejection sampling also leaves the draft's distribution in ``_pending``."""
        vocab = self.runner.config.model.vocab_size
        logits = penalise(logits, specs, ids, vocab)
        if all(s.temperature == 0.0 for s in specs):  # one argmax for the batch
            best = logits.argmax(-1)
            return (best if ids is None else ids[best]).tolist()
        out: dict[int, int] = {}
        drawn = [i for i, sp in enumerate(specs) if self._rejects(sp)]  # drafts drawn from q
        for i, (sp, pos) in enumerate(zip(specs, positions)):
            if not self._rejects(sp):  # greedy, or the noise the verifier will use
                out[i] = pick_draft(logits[i], sp, pos, vocab, ids)
        if drawn:
            index, q = draw_drafts(logits[drawn], [specs[i] for i in drawn], [positions[i] for i in drawn])
            for n, (i, k) in enumerate(zip(drawn, index)):
                out[i] = k if ids is None else int(ids[k])
                entry = self._pending.setdefault(seqs[i].seq_id, PendingDrafts(positions[i], [], [], []))
                entry.tokens.append(out[i])
                entry.index.append(k)
                entry.q.append(q[n])
        return [out[i] for i in range(len(specs))]

    def chain(self, seqs: list[SeqWork], last_pos: list[int], wanted: dict[int, int],
              sampled: dict[int, SampledTokens], state: Any,
              draft: Callable[[Any, list[SeqWork], list[SamplingSpec], list[int]], list[int]],
              advance: Callable[[Any, list[int], list[SeqWork]], Any]) -> dict[int, tuple[int, ...]]:
        """Draft until each of ``seqs`` (last verified position ``last_pos``) has ``wanted`` drafts:
        ``draft(state, active, specs, positions)`` draws a round's drafts (``draft_tokens`` on
        the method's logits), ``advance(state, keep, fed)`` gives the state after feeding the
        rows ``keep`` their new drafts (``fed``: those sequences with the draft as their token,
        one position on)."""
        drafts: dict[int, list[int]] = {s.seq_id: [] for s in seqs}
        active, pos, wanted = list(seqs), list(last_pos), dict(wanted)
        grammars = self.runner.grammars
        taken = dict.fromkeys(wanted, 0)  # drafts a grammar matcher consumed, rolled back below
        while True:
            # each draft under the spec (and grammar state) the verifier will use there
            specs = [grammars.constrain(s.seq_id, row_spec(
                s.sampling, sampled[s.seq_id].token_ids + tuple(drafts[s.seq_id]))) for s in active]
            new = draft(state, active, specs, [p + 2 for p in pos])
            for s, t in zip(active, new):
                drafts[s.seq_id].append(t)
                if s.sampling.grammar is not None:
                    if grammars.advance(s.seq_id, (t,)) == 1:
                        taken[s.seq_id] += 1
                    else:  # nothing the grammar allows is in the draft vocabulary: stop here
                        drafts[s.seq_id].pop()
                        wanted[s.seq_id] = len(drafts[s.seq_id])
            keep = [i for i, s in enumerate(active) if len(drafts[s.seq_id]) < wanted[s.seq_id]]
            if not keep:
                for sid, n in taken.items():
                    grammars.rollback(sid, n)
                return {sid: tuple(d) for sid, d in drafts.items()}
            active = [replace(active[i], token_ids=(new[i],), start_pos=pos[i] + 1) for i in keep]
            pos = [pos[i] + 1 for i in keep]
            state = advance(state, keep, active)


def make_decoder(runner, config: EngineConfig) -> SpeculativeDecoder:
    """The decoder of ``config.speculative.method``."""
    method = config.speculative.method
    if method == "gemma4_assistant":
        from dist_engine.worker.spec_assistant import AssistantDecoder

        return AssistantDecoder(runner, config)
    if method == "dflash":
        from dist_engine.worker.spec_dflash import DFlashDecoder

        return DFlashDecoder(runner, config)
    from dist_engine.worker.spec_decode import MTPDecoder

    return MTPDecoder(runner, config)
