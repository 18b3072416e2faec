"""Logprobs of the prompt's own tokens (``SamplingParams.prompt_logprobs``): what the OpenAI
completions API returns for ``echo`` with ``logprobs``, and what evaluation harnesses score
(the loglikelihood of a continuation given its context)."""

from __future__ import annotations

import torch

from dist_engine.worker.batch import ForwardBatch
from dist_engine.worker.messages import StepInput

ROWS_PER_HEAD_CALL = 128  # bounds the [rows, vocab] fp32 logits held at once


def prompt_logprob_rows(step: StepInput, batch: ForwardBatch, hidden: torch.Tensor, model
                        ) -> dict[int, tuple[tuple[float, tuple[tuple[int, float], ...]], ...]]:
    """Per sequence that asked: for each fed position p whose next token is a prompt token,
    (logprob of token p + 1 under the raw model distribution, its top-n (id, logprob)).
    ``hidden`` ``[T, H]``: the step's final-norm hidden states. A final prefill chunk's last
    position predicts the first sampled token, whose logprob is the sampled one's."""
    out = {}
    for s, start in zip(step.seqs, batch.starts):
        if s.prompt_logprobs is None:
            continue
        targets = s.token_ids[1:] + ((s.next_token,) if not s.sample else ())
        rows = []
        for a in range(0, len(targets), ROWS_PER_HEAD_CALL):
            tgt = torch.tensor(targets[a:a + ROWS_PER_HEAD_CALL], device=hidden.device)
            h = hidden[start + a:start + a + len(tgt)]  # [r, H]
            logp = torch.log_softmax(model.compute_logits(h).float(), dim=-1)  # [r, vocab]
            chosen = logp.gather(1, tgt.view(-1, 1)).view(-1).tolist()
            if s.prompt_logprobs:
                vals, ids = torch.topk(logp, s.prompt_logprobs, dim=-1)  # [r, n]
                tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
            else:
                tops = [()] * len(chosen)
            rows.extend(zip(chosen, tops))
        out[s.seq_id] = tuple(rows)
    return out
