"""Speculative method ``gemma4_assistant``: a Gemma 4 assistant drafter on a shard worker.

After verification, each proposing sequence's last verified position ``p - 1`` has the target's
final-norm hidden state (a row of this step's main pass) and its next token (the bonus, at
``p``) is known. The drafter (``models/gemma4_assistant.py``) reads the target's own cache (the
K/V of the target's last storing full and sliding layers, positions ``< p``, which this step's
verification has just written) and writes nothing: it needs no cache, no catch-up and no
lookahead slots of its own. Every draft round runs at the constant position ``p`` over the same
keys, so one attention metadata serves the whole chain (rebuilt only when a sequence stops).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dist_engine.config import EngineConfig
from dist_engine.config.gemma4 import SLIDING
from dist_engine.config.gemma4_assistant import Gemma4AssistantConfig, check_against
from dist_engine.layers.attention import AttentionMetadata
from dist_engine.layers.linear import pack_weights
from dist_engine.models.gemma4_assistant import Gemma4AssistantForCausalLM
from dist_engine.weights.loader import load_weights
from dist_engine.worker.batch import ForwardBatch
from dist_engine.worker.messages import SampledTokens, SamplingSpec, SeqWork, StepInput
from dist_engine.worker.speculative import SpeculativeDecoder


@dataclass
class _Round:
    """One draft round's rows: ``work`` (token = the fed token, start_pos = p - 1: the query's
    keys are positions < p), their metadata and constant positions ``p``, and the drafter's
    outputs for them."""

    work: list[SeqWork]
    meta: AttentionMetadata
    positions: torch.Tensor  # [N] long
    hidden: torch.Tensor  # [N, Hb]: post_projection of this round's output, the next round's input
    logits: torch.Tensor  # [N, vocab] fp32


class AssistantDecoder(SpeculativeDecoder):
    def __init__(self, runner, config: EngineConfig) -> None:
        super().__init__(runner, config)
        path, mcfg = self.spec.model, config.model
        if path is None:
            raise ValueError("speculative method gemma4_assistant needs the drafter's folder: "
                             "--speculative-model DIR (a gemma4_assistant checkpoint)")
        if runner.seq_comm is not None or runner.dcp_comm is not None:
            raise ValueError("the gemma4_assistant drafter does not run with context parallelism "
                             "(--cp / --dcp) yet; use mtp or no speculation there")
        acfg = Gemma4AssistantConfig.from_pretrained(path)
        self.sources = check_against(acfg, mcfg)
        if SLIDING in acfg.text.layer_types and acfg.text.sliding_window != mcfg.sliding_window:
            raise ValueError(f"the assistant's sliding window ({acfg.text.sliding_window}) differs from "
                             f"the model's ({mcfg.sliding_window}); it reads the model's sliding K/V")
        with torch.device(runner.device):
            self.model = Gemma4AssistantForCausalLM(acfg, self.sources, runner.comm, runner.dtype,
                                                    config.scheduler.max_model_len)
        load_weights(self.model, path)
        self.model.eval()
        pack_weights(self.model)

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _forward(self, work: list[SeqWork], meta: AttentionMetadata, positions: torch.Tensor,
                 hidden: torch.Tensor) -> _Round:
        target = self.runner.model.model
        ids = torch.tensor([w.token_ids[0] for w in work], device=hidden.device)
        emb = target.embed_tokens(ids) * target.embed_scale  # [N, Hb], as the target embeds
        caches = {t: self.runner.kv_caches[src] for t, src in self.sources.items()}
        h, logits = self.model(positions, emb, hidden, caches, meta)
        return _Round(work, meta, positions, h, logits)

    def _start(self, work: list[SeqWork], hidden: torch.Tensor) -> _Round:
        # transformers' flipped bidirectional window admits sliding_window + 1 keys (the target's
        # own sliding layers attend sliding_window); the driver keeps that one key more
        windows = [None if w is None else w + 1 for w in self.runner.windows]
        batch = self.runner.build(work, windows=windows)
        return self._forward(work, batch.meta, batch.positions + 1, hidden)

    def propose_next(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor,
                     prenorm: torch.Tensor | None, sampled: dict[int, SampledTokens]
                     ) -> dict[int, tuple[int, ...]]:
        work, rows, wanted = [], [], {}
        for s, start in zip(step.seqs, batch.starts):
            if not (s.sample and s.propose):
                continue
            got = sampled[s.seq_id].token_ids
            last = len(s.token_ids) - s.num_drafts - 1 + len(got) - 1  # last verified, in the step
            rows.append(start + last)
            work.append(SeqWork(s.seq_id, (got[-1],), s.start_pos + last, s.block_table, True,
                                s.sampling, group_tables=s.group_tables))
            wanted[s.seq_id] = s.propose
        if not work:
            return {}
        first = self._start(work, hidden[torch.tensor(rows, device=hidden.device)])

        def draft(r: _Round, seqs: list[SeqWork], specs: list[SamplingSpec], positions: list[int]) -> list[int]:
            return self.draft_tokens(r.logits, None, seqs, specs, positions)

        def advance(r: _Round, keep: list[int], fed: list[SeqWork]) -> _Round:
            index = torch.tensor(keep, device=r.hidden.device)
            # the drafter's position never moves: only the fed token changes
            tokens = [replace(r.work[i], token_ids=f.token_ids) for i, f in zip(keep, fed)]
            if len(keep) == len(r.work):  # same rows, same keys: the metadata stands
                return self._forward(tokens, r.meta, r.positions, r.hidden)
            return self._start(tokens, r.hidden[index])

        return self.chain(work, [w.start_pos for w in work], wanted, sampled, first, draft, advance)
