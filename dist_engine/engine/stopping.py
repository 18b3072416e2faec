"""Appending sampled tokens to a sequence and deciding when it stops.

Stop strings are matched on the decoded text, across token boundaries: text that could still be
the start of a stop string is held back (``pending_text``) and never released if the stop string
completes. EOS and stop token ids are kept in ``token_ids`` but not in the text.
"""

from __future__ import annotations

from dist_engine.engine.sequence import SeqStatus, Sequence
from dist_engine.worker.messages import SampledTokens


def _finish(seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
    seq.finish_reason = reason
    seq.stop_reason = stop_reason
    seq.status = SeqStatus.FINISHED


def _release_text(seq: Sequence, delta: str) -> bool:
    """Add decoded text; return True if a stop string completed (text cut before it)."""
    stops = seq.params.stop
    combined = seq.pending_text + delta
    if stops and len(seq.output_token_ids) > seq.params.min_tokens:
        hits = [(combined.find(s), s) for s in stops if s in combined]
        if hits:
            idx, s = min(hits)
            seq.text += combined[:idx]
            seq.pending_text = ""
            _finish(seq, "stop", s)
            return True
    hold = max((len(s) for s in stops), default=1) - 1
    cut = max(0, len(combined) - hold)
    seq.text += combined[:cut]
    seq.pending_text = combined[cut:]
    return False


def append_tokens(seq: Sequence, sampled: SampledTokens, eos_ids: frozenset[int], now: float) -> None:
    """Append drawn tokens in order until one of them ends the sequence."""
    p = seq.params
    seq.metrics.record_tokens(now, len(sampled.token_ids))
    for i, tok in enumerate(sampled.token_ids):
        seq.output_token_ids.append(tok)
        seq.cumulative_logprob += sampled.logprobs[i]
        if p.logprobs is not None:
            entry = dict(sampled.top_logprobs[i]) if i < len(sampled.top_logprobs) else {}
            entry[tok] = sampled.logprobs[i]
            seq.logprobs.append(entry)
        n_out = len(seq.output_token_ids)
        is_eos = tok in eos_ids and not p.ignore_eos
        if (is_eos or tok in p.stop_token_ids) and n_out >= p.min_tokens:
            _finish(seq, "stop", None if is_eos and tok not in p.stop_token_ids else tok)
        elif seq.detok is not None and _release_text(seq, seq.detok.add([tok])):
            pass
        elif n_out >= p.max_tokens:
            _finish(seq, "length")
        if seq.finished:
            break
    if seq.finished:
        seq.metrics.finished_time = now
        if seq.finish_reason != "stop" or not isinstance(seq.stop_reason, str):
            seq.text += seq.pending_text  # nothing can complete a stop string any more
            seq.pending_text = ""
