"""MTP self-speculative decoding on a shard worker: verify, accept, catch the MTP layer up, draft.

A step feeds each decoding sequence its last verified token plus the drafts proposed last step.
The main model's logits at those K + 1 positions are sampled exactly as plain decoding would
sample them (each row with the preceding drafts in its penalty / min-tokens context, Gumbel
noise keyed by the position), and drafts are accepted while they equal the sampled tokens. So
output is identical to plain decoding; rejected positions' K/V are simply not counted (the
driver advances a sequence by the accepted tokens only, later steps overwrite the rest).

The MTP layer then writes its own K/V for every newly verified position from the main model's
hidden states (slot p reads h[p] and token p + 1), which yields the first draft, and chains
itself K - 1 more times on its own output. Drafts of seeded requests use the same Gumbel noise
as the verifier will at that position, so a draft is accepted whenever the draft and the target
distributions pick the same token under shared noise. Requests without a seed are verified by
rejection sampling instead (``rejection.py``: same distribution, higher acceptance). Everything
happens in this one call: the driver sees one round trip per step.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from dist_engine.config import EngineConfig
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.linear import pack_weights
from dist_engine.models.mtp import MTPModel
from dist_engine.weights.loader import iter_checkpoint, load_weights
from dist_engine.worker.batch import ForwardBatch, hidden_rows
from dist_engine.worker.draft_head import DraftHead, draft_dtype, full_head_weight
from dist_engine.worker.messages import SampledTokens, SamplingSpec, SeqWork, StepInput, StepOutput
from dist_engine.worker.rejection import PendingDrafts, draw_drafts, target_logits, verify
from dist_engine.worker.sampler import penalise, sample
from dist_engine.worker.spec_rows import (
    CatchUp,
    VerifyRows,
    accept_drafts,
    catch_up_plans,
    pick_draft,
    row_spec,
)

DRAFT_VOCAB_TENSOR = "draft_vocab"  # int64 [V']: token ids by frequency, in a graft's file
GRAFT_WEIGHTS = "mtp.safetensors"


def _same_shape(work: list[SeqWork], fed: tuple[SeqWork, ...]) -> bool:
    """Every fed sequence catches up on exactly the positions it fed."""
    return len(work) == len(fed) and all(
        w.start_pos == s.start_pos and len(w.token_ids) == len(s.token_ids) for w, s in zip(work, fed))


class MTPDecoder:
    def __init__(self, runner, config: EngineConfig) -> None:
        self.runner = runner
        self.spec = spec = config.speculative
        mcfg = config.model
        with torch.device(runner.device):
            self.mtp = MTPModel(mcfg, runner.comm, runner.dtype, config.scheduler.max_model_len,
                                emb_first=spec.concat_order == "emb_hidden", expert_cache=runner.expert_cache)
        prefix = self.mtp.prefix()
        src = spec.model or mcfg.path
        load_weights(self.mtp, src, select=lambda n: n.startswith(prefix))
        self.mtp.eval()
        self.draft_dtype = draft_dtype(spec.draft_dtype, runner.dtype)
        # On CPU the MTP layer's products read 16-bit panels (the kernel's fp32-activation path):
        # activations, norms, attention and its cache keep the model's dtype.
        pack_weights(self.mtp, self.draft_dtype)
        self.draft_head: DraftHead | None = None
        vocab_ids = None
        if spec.model is not None:
            for name, lazy in iter_checkpoint(spec.model):
                if name == DRAFT_VOCAB_TENSOR:
                    vocab_ids = lazy[:].long()
        if spec.draft_vocab_size is not None:
            if vocab_ids is None:  # no frequency list: the lowest ids (byte tokens, merges first)
                vocab_ids = torch.arange(mcfg.vocab_size)
            vocab_ids = vocab_ids[: spec.draft_vocab_size]
        if vocab_ids is not None and len(vocab_ids) < mcfg.vocab_size:
            weight = full_head_weight(runner, config)[vocab_ids].to(runner.device)
            self.draft_head = DraftHead(weight.contiguous(), vocab_ids.to(runner.device), self.draft_dtype)
        # drafts proposed last step for rejection sampling: seq id -> their distributions
        self._pending: dict[int, PendingDrafts] = {}
        self.kv: LayerKV | None = None  # the MTP layer's cache (same blocks and slots)
        # seconds spent per phase (read by the benchmark to show where the time goes)
        self.seconds = {"verify": 0.0, "mtp_catch_up": 0.0, "draft_chain": 0.0, "main_forward": 0.0}

    def modules(self) -> list[torch.nn.Module]:
        """The MTP layer and, with a draft vocabulary, the draft head."""
        return [self.mtp] + ([self.draft_head] if self.draft_head is not None else [])

    # ---- drafting ----------------------------------------------------------------------------
    def _rejects(self, spec: SamplingSpec) -> bool:
        """Whether this request's drafts are drawn from q and verified by rejection sampling."""
        return spec.temperature != 0.0 and not spec.seeded and self.spec.unseeded_acceptance == "rejection"

    def _draft(self, g: torch.Tensor, seqs: list[SeqWork], specs: list[SamplingSpec],
               positions: list[int]) -> list[int]:
        """Draft tokens at ``positions`` from raw MTP outputs ``g`` ``[N, H]``, each row under
        the spec the verifier will use there (``row_spec``: penalties count the tokens before
        it, the min-tokens ban still on or off), so penalised or banned tokens are not drafted
        only to be rejected. A request verified by rejection sampling also leaves the draft's
        distribution in ``_pending``."""
        normed = self.mtp.layer.shared_head.norm(g)
        if self.draft_head is not None:
            logits, ids = self.draft_head(normed), self.draft_head.vocab_ids  # [N, V']
        else:
            logits, ids = self.runner.model.compute_logits(normed), None  # [N, V]
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

    def forward_layer(self, positions: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor,
                      meta) -> torch.Tensor:
        """The MTP layer's raw outputs ``[T, H]`` for tokens ``ids`` ``[T]`` (token p + 1 at
        position p) reading the hidden states ``hidden`` ``[T, H]`` of positions p; also what
        ``DecodeGraphs`` records for the MTP layer's rows."""
        emb = self.runner.model.model.embed_tokens(ids)  # [T, H]
        return self.mtp.layer(positions, emb, hidden, self.kv, meta)

    def _run(self, work: list[SeqWork], hidden: torch.Tensor, same_as: ForwardBatch | None = None
             ) -> tuple[torch.Tensor, ForwardBatch]:
        """MTP layer over ``work``; ``same_as``: a batch with exactly these positions and slots
        (the main pass's, when no drafts are fed or wanted), whose metadata is reused. Runs that
        fit go through the static-shape path CUDA graphs record (``cuda_graph.py``)."""
        r = self.runner
        if same_as is None:
            batch = r.build(work)
        else:
            ids = torch.tensor([t for w in work for t in w.token_ids], device=hidden.device)
            batch = replace(same_as, ids=ids)
        g = r.graphs.forward_mtp(work, hidden) if r.graphs is not None else None  # [T, H]
        if g is None:
            g = self.forward_layer(batch.positions, batch.ids, hidden, batch.meta)  # [T, H]
        return g, batch

    # ---- one step: verify, catch up, propose -----------------------------------------------------
    def step(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor,
             prenorm: torch.Tensor | None) -> StepOutput:
        t0 = time.perf_counter()
        sampled = self.verify(batch, hidden)
        self.runner.settle_states(step, batch, sampled)  # rejected drafts leave no state behind
        t1 = time.perf_counter()
        self.seconds["verify"] += t1 - t0
        rows_out = hidden_rows(step, batch, hidden, sampled)
        plans = catch_up_plans(step, batch, sampled)
        if plans:
            source = hidden if self.spec.hidden_stage == "normed" else prenorm
            g = self.catch_up(plans, step, batch, source)
            t2 = time.perf_counter()
            self.seconds["mtp_catch_up"] += t2 - t1
            if g is not None:
                for sid, drafts in self.propose([p for p in plans if p.propose], g, sampled).items():
                    sampled[sid] = replace(sampled[sid], draft_token_ids=drafts)
                self.seconds["draft_chain"] += time.perf_counter() - t2
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

    def catch_up(self, plans: list[CatchUp], step: StepInput, batch: ForwardBatch,
                 source: torch.Tensor) -> torch.Tensor | None:
        """Run the MTP layer over every verified position of ``plans`` (writing its cache);
        returns its outputs ``[N, H]`` at each proposer's last position (None: none proposes)."""
        work = [p.work for p in plans]
        proposers = any(p.propose for p in plans)
        if not proposers and _same_shape(work, step.seqs):
            # no drafts fed or wanted (a large batch): the main pass's positions and slots, its
            # rows in order; only the tokens are shifted by one
            g, mbatch = self._run(work, source, same_as=batch)
        else:
            rows = torch.tensor([i for p in plans for i in p.rows], device=source.device)
            g, mbatch = self._run(work, source[rows])
        return g[mbatch.sample_index] if proposers else None

    def propose(self, plans: list[CatchUp], g: torch.Tensor, sampled: dict[int, SampledTokens]
                ) -> dict[int, tuple[int, ...]]:
        """Chain the MTP layer from its catch-up outputs ``g`` ``[N, H]`` until each proposer
        has its drafts; each draft is drawn under the spec the verifier will use there."""
        drafts: dict[int, list[int]] = {p.work.seq_id: [] for p in plans}
        active = [p.work for p in plans]
        pos = [p.last_pos for p in plans]
        wanted = {p.work.seq_id: p.propose for p in plans}
        grammars = self.runner.grammars
        taken = dict.fromkeys(wanted, 0)  # drafts a grammar matcher consumed, rolled back below
        while True:
            # each draft under the spec (and grammar state) the verifier will use there
            specs = [grammars.constrain(s.seq_id, row_spec(
                s.sampling, sampled[s.seq_id].token_ids + tuple(drafts[s.seq_id]))) for s in active]
            new = self._draft(g, active, specs, [p + 2 for p in pos])
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
            feed = g if self.spec.feedback == "raw" else self.mtp.layer.shared_head.norm(g)
            active = [replace(active[i], token_ids=(new[i],), start_pos=pos[i] + 1) for i in keep]
            pos = [pos[i] + 1 for i in keep]
            g, _ = self._run(active, feed[torch.tensor(keep, device=g.device)])
