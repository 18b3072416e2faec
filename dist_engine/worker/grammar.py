"""Grammar matchers next to the sampler: one per constrained sequence, on every rank.

A sequence whose ``SamplingSpec.grammar`` is set gets an llguidance matcher the first time it
samples. Before each draw its row's spec carries the mask of the tokens the matcher's state
forbids (``SamplingSpec.disallowed``; ``sampler.penalise`` sets them to -inf, so greedy,
Gumbel-seeded and rejection sampling all stay inside the grammar). The matcher then consumes the
tokens the step emitted.

Speculation: verification row j is masked by the state after drafts[:j] (the matcher consumes
the drafts to compute the masks and rolls them back); a draft the grammar refuses can never
equal the masked draw at its row, so it is rejected like any other. After acceptance the
matcher consumes the emitted tokens (accepted drafts and the bonus). Drafting masks each
chained draft the same way and rolls the drafts back when the chain ends.

Every rank runs the same matchers on the same tokens, so ranks stay identical.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dist_engine.worker.messages import SamplingSpec

log = logging.getLogger(__name__)


class Grammars:
    def __init__(self, tokenizer_path: str, vocab_size: int) -> None:
        self.path, self.vocab = tokenizer_path, vocab_size
        self._tok = None
        self.matchers: dict[int, object] = {}  # seq id -> LLMatcher
        self._bits = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)

    def _tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            from dist_engine.engine.structured import ll_tokenizer

            self._tok = ll_tokenizer(AutoTokenizer.from_pretrained(self.path), self.vocab)
        return self._tok

    def matcher(self, seq_id: int, spec: SamplingSpec):
        """The sequence's matcher (None: unconstrained), made on first use."""
        if spec.grammar is None:
            return None
        m = self.matchers.get(seq_id)
        if m is None:
            from llguidance import LLMatcher

            m = self.matchers[seq_id] = LLMatcher(self._tokenizer(), spec.grammar, log_level=0)
            if m.is_error():  # the driver validated it: this would be an engine bug
                raise RuntimeError(f"grammar of sequence {seq_id} failed: {m.get_error()}")
        return m

    def release(self, seq_ids) -> None:
        for sid in seq_ids:
            self.matchers.pop(sid, None)

    # ---- masks ----------------------------------------------------------------------------
    def _disallowed(self, m) -> torch.Tensor:
        """``[vocab]`` bool: True for the tokens the matcher's state does not allow next."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(m, self._bits, 0)  # [1, ceil(vocab / 32)] int32, bit i: token i
        # one numpy call (a handful of torch ops on 49k elements cost ~100x more on a busy CPU)
        bits = np.unpackbits(self._bits[0].numpy().view(np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab] == 0)

    def constrain(self, seq_id: int, spec: SamplingSpec) -> SamplingSpec:
        """``spec`` with its sequence's current mask (unchanged if unconstrained)."""
        m = self.matcher(seq_id, spec)
        if m is None:
            return spec
        return spec.with_disallowed(self._disallowed(m))

    def constrain_rows(self, seq_id: int, specs: tuple[SamplingSpec, ...],
                       drafts: tuple[int, ...]) -> tuple[SamplingSpec, ...]:
        """Verification rows: row j masked by the state after ``drafts[:j]``. Past the first
        draft the grammar refuses, rows keep that draft's mask (they are never emitted)."""
        m = self.matcher(seq_id, specs[0])
        if m is None:
            return specs
        out, consumed, mask = [], 0, None
        for j, spec in enumerate(specs):
            if j == consumed:
                mask = self._disallowed(m)
                if j < len(drafts) and m.try_consume_tokens([drafts[j]]) == 1:
                    consumed += 1
            out.append(spec.with_disallowed(mask))
        m.rollback(consumed)
        return tuple(out)

    def advance(self, seq_id: int, tokens) -> int:
        """Consume emitted (or, while drafting, proposed) tokens; returns how many it took."""
        m = self.matchers.get(seq_id)
        if m is None:
            return 0
        taken = m.try_consume_tokens(list(tokens))
        if taken < len(tokens):
            log.debug("sequence %d: the grammar took %d of %d tokens", seq_id, taken, len(tokens))
        return taken

    def rollback(self, seq_id: int, n: int) -> None:
        if n and seq_id in self.matchers:
            self.matchers[seq_id].rollback(n)
