"""Speculative method ``dflash``: a DFlash block-diffusion drafter on a shard worker.

The main pass's outputs of the drafter's ``target_layer_ids`` layers are kept (forward hooks:
the layers' own outputs, whatever the model). After verification, in the same call:

1. context: every newly verified position (prefill chunks, the last token and accepted drafts
   of a decoding step) gets its context K/V written into each drafter layer's cache (the
   target's block ids and slots, like the MTP layer's cache); rejected drafts write nothing;
2. proposal: each proposing sequence runs one non-causal block ``[bonus token, mask x (B-1)]``
   at the positions after its last verified one, over that context; rows 1..K of the block
   (K <= B - 1) through the target's head are the drafts, each drawn under the spec the
   verifier will use at its position (greedy, seeded Gumbel, or kept for rejection sampling).

The whole block is always run (the drafter was trained on blocks of B); with K < B - 1 only the
first K rows are drafted. A drafter from ``graft-dflash`` may carry a ``draft_vocab`` tensor (the
token ids it was trained to draft, as an MTP graft does): its rows are then scored over those ids
only (the target's head restricted to them); verification stays full-vocabulary. Nothing is written past the verified positions, so the method needs
only the K lookahead slots verification uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dist_engine.config import EngineConfig
from dist_engine.config.dflash import DFlashConfig
from dist_engine.layers.linear import pack_weights
from dist_engine.models.dflash import DFlashDraftModel
from dist_engine.weights.loader import iter_checkpoint, load_weights
from dist_engine.worker.batch import ForwardBatch
from dist_engine.worker.draft_head import DraftHead, draft_dtype, full_head_weight
from dist_engine.worker.messages import SampledTokens, SamplingSpec, SeqWork, StepInput
from dist_engine.worker.spec_decode import DRAFT_VOCAB_TENSOR
from dist_engine.worker.speculative import SpeculativeDecoder


@dataclass(frozen=True)
class _Column:
    """Draft logits of the still-drafting sequences ``[N, B - 1, V]`` and the column drawn next."""

    logits: torch.Tensor
    j: int


class DFlashDecoder(SpeculativeDecoder):
    def __init__(self, runner, config: EngineConfig) -> None:
        super().__init__(runner, config)
        path, mcfg = self.spec.model, config.model
        if runner.seq_comm is not None or runner.dcp_comm is not None:
            raise ValueError("the dflash drafter does not run with context parallelism (--cp / --dcp) "
                             "yet; use mtp or no speculation there")
        self.cfg = cfg = DFlashConfig.from_pretrained(path)
        cfg.check_against(mcfg)
        k = self.spec.num_speculative_tokens
        if k > cfg.block_size - 1:
            raise ValueError(f"num_speculative_tokens={k} exceeds what a DFlash block of {cfg.block_size} "
                             f"proposes ({cfg.block_size - 1})")
        with torch.device(runner.device):
            self.model = DFlashDraftModel(cfg, mcfg.hidden_size, runner.dtype, config.scheduler.max_model_len)
        load_weights(self.model, path, select=lambda n: n != DRAFT_VOCAB_TENSOR)
        self.model.eval()
        pack_weights(self.model)
        self.draft_head = None
        for name, lazy in iter_checkpoint(path):
            if name == DRAFT_VOCAB_TENSOR:
                ids = lazy[:].long()
                weight = full_head_weight(runner, config)[ids].to(runner.device)
                self.draft_head = DraftHead(weight.contiguous(), ids.to(runner.device),
                                            draft_dtype(self.spec.draft_dtype, runner.dtype))
        # the target layers' outputs of the last main pass, kept by hooks on those layers
        self._features: dict[int, torch.Tensor] = {}
        layers = runner.model.model.layers
        for i in cfg.target_layer_ids:
            layers[i].register_forward_hook(self._keeper(i))
        if getattr(runner.model.model, "cpu_decoder", None) is not None:
            runner.model.model.cpu_decoder = None  # its one C call per step hides the layer outputs

    def _keeper(self, i: int):
        def keep(module, args, out) -> None:
            self._features[i] = out
        return keep

    def modules(self) -> list[torch.nn.Module]:
        return [self.model] + ([self.draft_head] if self.draft_head is not None else [])

    def cache_layers(self) -> list[torch.nn.Module]:
        return list(self.model.layers)

    def metadata_layers(self) -> list[torch.nn.Module]:
        return []  # a block attends its gathered context itself (not causal, not paged)

    def propose_next(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor,
                     prenorm: torch.Tensor | None, sampled: dict[int, SampledTokens]
                     ) -> dict[int, tuple[int, ...]]:
        t0 = time.perf_counter()
        features = torch.cat([self._features[i] for i in self.cfg.target_layer_ids], dim=-1)  # [T, L * H]
        self._features.clear()
        work, rows, plans = [], [], []
        for s, start in zip(step.seqs, batch.starts):
            if not s.mtp:  # runs without speculation: its drafter context is never read
                continue
            got = sampled[s.seq_id].token_ids if s.sample else ()
            n = len(s.token_ids) - s.num_drafts + max(0, len(got) - 1)  # fed tokens now verified
            if n:
                rows.extend(range(start, start + n))
                work.append(SeqWork(s.seq_id, s.token_ids[:n], s.start_pos, s.block_table, False,
                                    group_tables=s.group_tables))
            if s.sample and s.propose:
                plans.append((s, s.start_pos + n, got[-1]))  # the block's first position and token
        if work:
            ctx = self.runner.build(work)
            self.model.write_context(ctx.positions, features[torch.tensor(rows, device=features.device)],
                                     self.caches, ctx.meta)
        self.seconds["mtp_catch_up"] += time.perf_counter() - t0
        if not plans:
            return {}
        t1 = time.perf_counter()
        logits = self._propose_blocks(plans)  # [N, B - 1, V]
        seqs = [s for s, _, _ in plans]

        def draft(col: _Column, active: list[SeqWork], specs: list[SamplingSpec], positions: list[int]) -> list[int]:
            ids = self.draft_head.vocab_ids if self.draft_head is not None else None
            return self.draft_tokens(col.logits[:, col.j], ids, active, specs, positions)

        def advance(col: _Column, keep: list[int], fed: list[SeqWork]) -> _Column:
            return _Column(col.logits[torch.tensor(keep, device=col.logits.device)], col.j + 1)

        out = self.chain(seqs, [p - 1 for _, p, _ in plans], {s.seq_id: s.propose for s in seqs},
                         sampled, _Column(logits, 0), draft, advance)
        self.seconds["draft_chain"] += time.perf_counter() - t1
        return out

    def _propose_blocks(self, plans: list[tuple[SeqWork, int, int]]) -> torch.Tensor:
        """Draft logits ``[N, B - 1, V]`` fp32 (``V``: the draft vocabulary's size, if any) of one
        block per plan (sequence, first position P, known token), over the context cached at
        positions < P."""
        cfg, dev, bs = self.cfg, self.runner.device, self.runner.block_size
        B, N = cfg.block_size, len(plans)
        C = max(1, max(p for _, p, _ in plans))
        ctx = torch.arange(C)
        slots = torch.zeros(N, C, dtype=torch.long)
        for n, (s, p, _) in enumerate(plans):
            table = torch.tensor(s.block_table[:(p + bs - 1) // bs], dtype=torch.long)
            slots[n, :p] = table[ctx[:p] // bs] * bs + ctx[:p] % bs
        valid = (ctx[None, :] < torch.tensor([p for _, p, _ in plans])[:, None]).to(dev)  # [N, C]
        ids = torch.tensor([[tok] + [cfg.mask_token_id] * (B - 1) for _, _, tok in plans], device=dev)
        positions = (torch.tensor([p for _, p, _ in plans])[:, None] + torch.arange(B)).to(dev).view(-1)
        target = self.runner.model
        x = target.model.embed_tokens(ids.view(-1)) * cfg.input_embedding_scale  # [N * B, hidden]
        h = self.model(positions, x, self.caches, slots.to(dev), valid)
        rows = h.view(N, B, -1)[:, 1:].reshape(N * (B - 1), -1)
        head = self.draft_head if self.draft_head is not None else target.lm_head
        logits = head(rows).float() * cfg.output_multiplier
        if cfg.final_logit_softcapping:
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits.view(N, B - 1, -1)
