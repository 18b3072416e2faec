"""Rejection sampling for speculative requests that named no seed.

A seeded request must repeat plain seeded sampling token for token, so its drafts are verified
by the Gumbel scheme (``spec_decode.py``): a draft is accepted when it equals the token the
verifier draws under the noise it shares with the draft. A request without a seed only needs
the right distribution, and the classic speculative-sampling rule accepts more often: draw the
draft ``d_j ~ q_j`` (the MTP layer's tempered, masked distribution), accept it with probability
``min(1, p_j(d_j) / q_j(d_j))``, where ``p_j`` is the target distribution of that row exactly
as plain sampling builds it (penalties and bans with the preceding drafts in context,
temperature, top-k / top-p / min-p); at the first rejection draw from the residual
``max(p_j - q_j, 0)`` (normalised) and stop; when all K are accepted the bonus token is the
verifier's own draw from ``p_K``. Each emitted token then has exactly ``p``'s distribution, and
a draft is accepted with probability ``sum_v min(p(v), q(v))``, the most any draft-then-verify
scheme can accept; the shared-noise coupling accepts less whenever ``p`` and ``q`` differ.

Randomness stays counter-based, keyed by (seed, position, stream), so every rank draws the same
numbers whatever the batch. Stream 0 is the verifier's Gumbel noise (``sampler.py``; here only
the bonus row uses it); the others are below. A draft discarded unverified (an earlier draft was
rejected) is redrawn with the same noise next step: nothing observable depended on it, so the
new draw is still independent of everything seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_engine.kernels.gumbel import noise_rows
from dist_engine.worker.messages import SamplingSpec
from dist_engine.worker.sampler import apply_masks, mix64, noise_seed, penalise

STREAM_DRAFT, STREAM_ACCEPT, STREAM_RESIDUAL = 1, 2, 3


def stream_key(seed: int, position: int, stream: int) -> int:
    """A noise key in [0, 2^63) for (seed, position, stream), hashed like ``noise_seed``."""
    return mix64(noise_seed(seed, position) ^ (stream * 0xD1B54A32D192ED03)) >> 1


def uniform(seed: int, position: int) -> float:
    """The acceptance test's uniform in (0, 1) for the draft at ``position``."""
    z = mix64(stream_key(seed, position, STREAM_ACCEPT) + 0x9E3779B97F4A7C15)
    return ((z >> 11) + 0.5) * 2.0 ** -53


def target_logits(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """``[N, V]`` raw logits -> the tempered, masked logits plain sampling draws each row from
    (penalties and bans, then temperature and top-k / top-p / min-p)."""
    x = penalise(logits, specs)
    return torch.stack([apply_masks(x[i], spec) for i, spec in enumerate(specs)])


def draw_drafts(logits: torch.Tensor, specs: list[SamplingSpec], positions: list[int]
                ) -> tuple[list[int], torch.Tensor]:
    """Sample one draft per row of draft logits ``[N, V']`` from its tempered, masked softmax.

    Returns the drafts' indices into the row and the distributions ``q`` ``[N, V']`` they were
    drawn from (the verifier needs both). The caller has already applied the row's penalties
    and bans (any ``q`` keeps the output exact; one closer to the target accepts more often).
    """
    x = torch.stack([apply_masks(logits[i], s) for i, s in enumerate(specs)])  # [N, V']
    q = torch.softmax(x, dim=-1)
    keys = [stream_key(s.seed, p, STREAM_DRAFT) for s, p in zip(specs, positions)]
    drawn = (x + noise_rows(keys, x.shape[-1]).to(x.device)).argmax(-1)
    return drawn.tolist(), q


@dataclass
class PendingDrafts:
    """What the worker keeps about one sequence's drafts until the next step verifies them."""

    first_position: int  # position of drafts[0]
    tokens: list[int]  # draft token ids
    index: list[int]  # each draft's index into its row of q
    q: list[torch.Tensor]  # [V'] the distribution each draft was drawn from

    def matches(self, drafts: tuple[int, ...], first_position: int) -> bool:
        """Whether the fed drafts are a prefix of these (the driver may feed fewer)."""
        return first_position == self.first_position and tuple(self.tokens[: len(drafts)]) == drafts


def verify(pending: PendingDrafts, drafts: tuple[int, ...], target: torch.Tensor, spec: SamplingSpec,
           vocab_ids: torch.Tensor | None) -> tuple[int, int | None]:
    """Accept or reject ``drafts`` against ``target`` ``[k, V]`` (``target_logits`` of their
    rows). Returns the number accepted and, if one was rejected, the token drawn from the
    residual at its position (None: all accepted, the bonus is the verifier's own draw).
    ``vocab_ids`` maps q's columns to token ids (None: q spans the whole vocabulary)."""
    p = torch.softmax(target, dim=-1)  # [k, V]
    for j, d in enumerate(drafts):
        pos = pending.first_position + j
        qd = float(pending.q[j][pending.index[j]])
        if uniform(spec.seed, pos) * qd < float(p[j, d]):
            continue
        q_full = pending.q[j] if vocab_ids is None else torch.zeros_like(p[j]).index_copy_(
            0, vocab_ids, pending.q[j])
        residual = (p[j] - q_full).clamp_(min=0.0)
        if not float(residual.sum()) > 0.0:  # p <= q everywhere: only rounding gets here
            residual = p[j]
        g = noise_rows([stream_key(spec.seed, pos, STREAM_RESIDUAL)], p.shape[-1])[0].to(p.device)
        return j, int((residual.log() + g).argmax())
    return len(drafts), None
