"""Typed messages between the engine (driver) and the shard workers.

Only token ids, positions, block tables and sampling settings go to the workers; only sampled
token ids (and small stats) come back. Hidden states, logits and KV stay on the workers, except
the final-norm hidden states a request asks for (``SamplingParams.return_hidden_states``; the
self-distillation data of ``dist-engine graft-mtp``), which rank 0 sends back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from dist_engine.experts.stats import ExpertCacheStats


@dataclass(frozen=True)
class SamplingSpec:
    """What a worker needs to draw a request's next token.

    temperature 0 means greedy. Otherwise the token is ``argmax(masked_logits / T + g)`` with
    Gumbel noise ``g`` keyed by (seed, position), so a seeded request draws the same token
    whatever the batch or layout.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int = 0
    # The request named its seed: speculation must repeat plain seeded sampling token for token
    # (Gumbel verification). False: drafts may be verified by rejection sampling (same
    # distribution, higher acceptance; ``worker/rejection.py``).
    seeded: bool = True
    logprobs: int = 0  # number of top logprobs to return (0: none; sampled token's always)
    banned_token_ids: tuple[int, ...] = ()  # never drawn (EOS/stop ids before min_tokens)
    banned_for: int = 1  # ...for this many upcoming tokens (drafts verified in one step count)
    # Penalties, applied to the raw logits before temperature and masks (as vLLM does). The
    # token context is sent only when a penalty is on: the prompt's distinct ids (repetition
    # penalty) and (id, count) of the generated ids (all three penalties).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    prompt_ids: tuple[int, ...] = ()
    output_counts: tuple[tuple[int, int], ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, bias) added after the penalties
    # structured output: an llguidance grammar the tokens must follow (``worker/grammar.py``)
    grammar: str | None = None
    # set on the worker, never sent: ``[vocab]`` bool, True where the grammar forbids the token
    disallowed: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def with_disallowed(self, disallowed: torch.Tensor) -> SamplingSpec:
        return replace(self, disallowed=disallowed)


@dataclass(frozen=True)
class SeqWork:
    """One sequence's share of an engine step."""

    seq_id: int
    token_ids: tuple[int, ...]  # fed this step: a prefill chunk, or the last sampled token
    start_pos: int  # absolute position of token_ids[0]
    block_table: tuple[int, ...]  # logical block i of the sequence -> block id (primary group)
    sample: bool  # draw a token after the last fed one (false for a non-final prefill chunk)
    sampling: SamplingSpec = SamplingSpec()
    # Speculative decoding: the last ``num_drafts`` fed tokens are drafts to verify; the worker
    # then proposes ``propose`` drafts for the next step. ``next_token`` is the prompt token
    # after a non-final prefill chunk (the MTP layer at position p reads token p + 1).
    num_drafts: int = 0
    propose: int = 0
    next_token: int | None = None
    mtp: bool = True  # the MTP layer writes its cache for this sequence's verified positions
    return_hidden: bool = False  # send back the final-norm hidden states of its verified positions
    # top-n logprobs of the prompt tokens after each fed one (None: not asked); the token after
    # a non-final chunk's last position is ``next_token``
    prompt_logprobs: int | None = None
    # Models with recurrent layers (cache kind RecurrentState): the sequence's live state slot;
    # a checkpoint slot to copy into it before this step (a prefix-cache hit resumes there);
    # and (position, checkpoint slot) pairs: save the state after ``position`` tokens there
    # once the step has verified that far.
    state_slot: int | None = None
    restore_from: int | None = None
    save_states: tuple[tuple[int, int], ...] = ()
    # the other paged groups' tables (sliding-window layers beside full attention), in the
    # order of ``kinds.paged_groups``; entries behind a window may name blocks given back
    group_tables: tuple[tuple[int, ...], ...] = ()

    @property
    def context_len(self) -> int:  # tokens in the cache once this step has written its own
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class StepInput:
    step_id: int
    seqs: tuple[SeqWork, ...]
    released: tuple[int, ...] = ()  # sequences ended since the last step: drop their state


@dataclass(frozen=True)
class SampledTokens:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # logprob of each sampled token under the (unmasked) model
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()  # per token: (id, logprob)
    num_drafts: int = 0  # drafts verified this step; the first len(token_ids) - 1 were accepted
    draft_token_ids: tuple[int, ...] = ()  # proposed for the next step

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1 if self.num_drafts else 0


@dataclass(frozen=True)
class StepOutput:
    step_id: int
    sampled: dict[int, SampledTokens]  # seq_id -> tokens drawn this step
    # seq_id -> final-norm hidden states [n, H] of the positions verified this step, from the
    # first one fed on, for sequences fed with ``return_hidden`` (rank 0 only)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    # the expert cache's counters after this step (paged experts only; merged over ranks)
    experts: ExpertCacheStats | None = None
    # seq_id -> per fed prompt position p: (logprob of prompt token p + 1, top-n (id, logprob))
    prompt_logprobs: dict[int, tuple[tuple[float, tuple[tuple[int, float], ...]], ...]] = field(
        default_factory=dict)
