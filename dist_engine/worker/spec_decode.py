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
from dist_engine.worker.sampler import gumbel_noise, penalise, sample

DRAFT_VOCAB_TENSOR = "draft_vocab"  # int64 [V']: token ids by frequency, in a graft's file
GRAFT_WEIGHTS = "mtp.safetensors"


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


def _same_shape(work: list[SeqWork], fed: tuple[SeqWork, ...]) -> bool:
    """Every fed sequence catches up on exactly the positions it fed."""
    return len(work) == len(fed) and all(
        w.start_pos == s.start_pos and len(w.token_ids) == len(s.token_ids) for w, s in zip(work, fed))


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
        out = [-1 if self._rejects(sp) else pick_draft(logits[i], sp, pos, vocab, ids)
               for i, (sp, pos) in enumerate(zip(specs, positions))]
        rej = [i for i, t in enumerate(out) if t < 0]
        if rej:
            index, q = draw_drafts(logits[rej], [specs[i] for i in rej], [positions[i] for i in rej])
            for n, (i, k) in enumerate(zip(rej, index)):
                out[i] = k if ids is None else int(ids[k])
                entry = self._pending.setdefault(seqs[i].seq_id, PendingDrafts(positions[i], [], [], []))
                entry.tokens.append(out[i])
                entry.index.append(k)
                entry.q.append(q[n])
        return out

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
            emb = r.model.model.embed_tokens(batch.ids)  # [T, H]
            g = self.mtp.layer(batch.positions, emb, hidden, self.kv, batch.meta)  # [T, H]
        return g, batch

    # ---- one step ------------------------------------------------------------------------------
    def step(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor,
             prenorm: torch.Tensor | None) -> StepOutput:
        r = self.runner
        t0 = time.perf_counter()
        sampled: dict[int, SampledTokens] = {}
        if batch.sample_seqs:
            logits = r.model.compute_logits(hidden[batch.sample_index])  # [R, vocab] fp32
            pending, self._pending = self._pending, {}
            specs, draw, positions, entries = [], [], [], []
            for s in batch.sample_seqs:
                k = s.num_drafts
                drafts = s.token_ids[len(s.token_ids) - k:]
                entry = pending.get(s.seq_id) if k and self._rejects(s.sampling) else None
                entries.append(entry if entry is not None and entry.matches(drafts, s.context_len - k)
                               else None)
                for j in range(k + 1):
                    specs.append(row_spec(s.sampling, drafts[:j]))
                    # a draft verified by rejection sampling is accepted or replaced by the
                    # residual's draw: only the last row's own draw (the bonus) can be emitted,
                    # so the others skip the noise (a greedy row costs a fraction of a drawn one)
                    draw.append(replace(specs[-1], temperature=0.0)
                                if entries[-1] is not None and j < k else specs[-1])
                    positions.append(s.context_len - k + j)
            tokens, lps, top = sample(logits, draw, positions)
            row = 0
            for s, entry in zip(batch.sample_seqs, entries):
                k = s.num_drafts
                drafts = s.token_ids[len(s.token_ids) - k:]
                if entry is not None:
                    target = target_logits(logits[row:row + k], specs[row:row + k])
                    a, tok = verify(entry, drafts, target, s.sampling,
                                    None if self.draft_head is None else self.draft_head.vocab_ids)
                    # accepted drafts, then the residual's draw at the rejected row (all
                    # accepted: the verifier's own draw at the last row is the bonus)
                    emitted = drafts[:a] + ((tok,) if tok is not None else ())
                    if emitted:
                        lp = torch.log_softmax(logits[row:row + len(emitted)], -1)
                        for j, t in enumerate(emitted):
                            tokens[row + j], lps[row + j] = t, float(lp[j, t])
                else:  # seeded, greedy, or drafts this worker did not draw: the Gumbel scheme
                    a = accept_drafts(drafts, tokens[row:row + k])
                sampled[s.seq_id] = SampledTokens(
                    tuple(tokens[row:row + a + 1]), tuple(lps[row:row + a + 1]),
                    tuple(top[row:row + a + 1]) if any(top[row:row + a + 1]) else (), num_drafts=k)
                row += k + 1
        t1 = time.perf_counter()
        self.seconds["verify"] += t1 - t0
        # The MTP layer catches up on every verified position of this step.
        source = hidden if self.spec.hidden_stage == "normed" else prenorm
        work, rows, proposers, last_pos = [], [], [], []
        wanted: dict[int, int] = {}  # seq id -> drafts to propose
        for s, start in zip(step.seqs, batch.starts):
            if not s.mtp:  # runs without speculation: its MTP cache is never read
                continue
            base = len(s.token_ids) - s.num_drafts
            if s.sample:
                got = sampled[s.seq_id].token_ids
                m = base + len(got) - 1
                toks = s.token_ids[1:m] + (got[-1],)
            elif s.next_token >= 0:
                m, toks = base, s.token_ids[1:] + (s.next_token,)
            else:
                continue
            wants = s.sample and s.propose > 0
            work.append(SeqWork(s.seq_id, toks, s.start_pos, s.block_table, wants, s.sampling))
            rows.extend(range(start, start + m))
            if wants:
                proposers.append(work[-1])
                last_pos.append(s.start_pos + m - 1)
                wanted[s.seq_id] = s.propose
        rows_out = hidden_rows(step, batch, hidden, sampled)
        if not work:
            return StepOutput(step.step_id, sampled, rows_out)
        if not proposers and _same_shape(work, step.seqs):
            # no drafts fed or wanted (a large batch): the main pass's positions and slots, its
            # rows in order; only the tokens are shifted by one
            g, mbatch = self._run(work, source, same_as=batch)
        else:
            g, mbatch = self._run(work, source[torch.tensor(rows, device=hidden.device)])
        t2 = time.perf_counter()
        self.seconds["mtp_catch_up"] += t2 - t1
        if not proposers:
            return StepOutput(step.step_id, sampled, rows_out)
        g = g[mbatch.sample_index]  # [N, H] outputs at each proposer's last position
        drafts = {s.seq_id: [] for s in proposers}
        active, pos = proposers, last_pos
        while True:
            specs = [row_spec(s.sampling, sampled[s.seq_id].token_ids + tuple(drafts[s.seq_id]))
                     for s in active]
            new = self._draft(g, active, specs, [p + 2 for p in pos])
            for s, t in zip(active, new):
                drafts[s.seq_id].append(t)
            keep = [i for i, s in enumerate(active) if len(drafts[s.seq_id]) < wanted[s.seq_id]]
            if not keep:
                break
            feed = g if self.spec.feedback == "raw" else self.mtp.layer.shared_head.norm(g)
            active = [replace(active[i], token_ids=(new[i],), start_pos=pos[i] + 1) for i in keep]
            pos = [pos[i] + 1 for i in keep]
            g, _ = self._run(active, feed[torch.tensor(keep, device=g.device)])
        for sid, d in drafts.items():
            sampled[sid] = replace(sampled[sid], draft_token_ids=tuple(d))
        self.seconds["draft_chain"] += time.perf_counter() - t2
        return StepOutput(step.step_id, sampled, rows_out)
