"""Speculative method ``mtp``: the model's MTP layers (or a graft of one) on a shard worker.

After verification (``speculative.py``) the MTP layer writes its own K/V for every newly
verified position from the main model's hidden states (slot p reads h[p] and token p + 1),
which yields the first draft, and chains itself K - 1 more times on its own output.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from dist_engine.config import EngineConfig
from dist_engine.kernels.decoder import attach_block
from dist_engine.layers.linear import pack_weights
from dist_engine.models.mtp import MTPModel
from dist_engine.quant.linear import quantize_dense
from dist_engine.weights.loader import iter_checkpoint, load_weights
from dist_engine.worker.batch import ForwardBatch
from dist_engine.worker.draft_head import DraftHead, draft_dtype, full_head_weight
from dist_engine.worker.messages import SampledTokens, SamplingSpec, SeqWork, StepInput
from dist_engine.worker.spec_rows import CatchUp, catch_up_plans
from dist_engine.worker.speculative import SpeculativeDecoder

DRAFT_VOCAB_TENSOR = "draft_vocab"  # int64 [V']: token ids by frequency, in a graft's file
GRAFT_WEIGHTS = "mtp.safetensors"


def _same_shape(work: list[SeqWork], fed: tuple[SeqWork, ...]) -> bool:
    """Every fed sequence catches up on exactly the positions it fed."""
    return len(work) == len(fed) and all(
        w.start_pos == s.start_pos and len(w.token_ids) == len(s.token_ids) for w, s in zip(work, fed))


class MTPDecoder(SpeculativeDecoder):
    def __init__(self, runner, config: EngineConfig) -> None:
        super().__init__(runner, config)
        spec = self.spec
        mcfg = config.model
        with torch.device(runner.device):
            self.mtp = MTPModel(mcfg, runner.comm, runner.dtype, config.scheduler.max_model_len,
                                emb_first=spec.concat_order == "emb_hidden", expert_cache=runner.expert_cache)
        prefix = self.mtp.prefix()
        src = spec.model or mcfg.path
        load_weights(self.mtp, src, select=lambda n: n.startswith(prefix))
        self.mtp.eval()
        self.draft_dtype = draft_dtype(spec.draft_dtype, runner.dtype)
        # On CPU the MTP layer's products read 16-bit panels (the kernel's fp32-activation path)
        # or int8 / int4 groups: activations, norms, attention and its cache keep the model's dtype.
        if isinstance(self.draft_dtype, str):
            quantize_dense(self.mtp, self.draft_dtype)
        pack_weights(self.mtp, self.draft_dtype if isinstance(self.draft_dtype, torch.dtype) else None)
        attach_block(self.mtp.layer)  # CPU: a plain Llama block drafts in one C call
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

    def modules(self) -> list[torch.nn.Module]:
        """The MTP layer and, with a draft vocabulary, the draft head."""
        return [self.mtp] + ([self.draft_head] if self.draft_head is not None else [])

    def cache_layers(self) -> list[torch.nn.Module]:
        return [self.mtp.layer]  # its cache: the same blocks and slots as the model's

    @property
    def kv(self):
        """The MTP layer's cache (None until allocated)."""
        return self.caches[0] if self.caches else None

    def _draft(self, g: torch.Tensor, seqs: list[SeqWork], specs: list[SamplingSpec],
               positions: list[int]) -> list[int]:
        """Drafts at ``positions`` from raw MTP outputs ``g`` ``[N, H]`` (``draft_tokens``)."""
        normed = self.mtp.layer.shared_head.norm(g)
        if self.draft_head is not None:
            logits, ids = self.draft_head(normed), self.draft_head.vocab_ids  # [N, V']
        else:
            logits, ids = self.runner.model.compute_logits(normed), None  # [N, V]
        return self.draft_tokens(logits, ids, seqs, specs, positions)

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

    def propose_next(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor,
                     prenorm: torch.Tensor | None, sampled: dict[int, SampledTokens]
                     ) -> dict[int, tuple[int, ...]]:
        """Catch the MTP layer up on every verified position, then chain it for the drafts."""
        plans = catch_up_plans(step, batch, sampled)
        if not plans:
            return {}
        t1 = time.perf_counter()
        source = hidden if self.spec.hidden_stage == "normed" else prenorm
        g = self.catch_up(plans, step, batch, source)
        t2 = time.perf_counter()
        self.seconds["mtp_catch_up"] += t2 - t1
        if g is None:
            return {}
        drafts = self.propose([p for p in plans if p.propose], g, sampled)
        self.seconds["draft_chain"] += time.perf_counter() - t2
        return drafts

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
        has its drafts."""
        def advance(g: torch.Tensor, keep: list[int], fed: list[SeqWork]) -> torch.Tensor:
            feed = g if self.spec.feedback == "raw" else self.mtp.layer.shared_head.norm(g)
            return self._run(fed, feed[torch.tensor(keep, device=g.device)])[0]

        return self.chain([p.work for p in plans], [p.last_pos for p in plans],
                          {p.work.seq_id: p.propose for p in plans}, sampled, g, self._draft, advance)
