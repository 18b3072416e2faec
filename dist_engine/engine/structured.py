"""Structured output: a request's constraint on what it may generate, as a grammar.

``StructuredOutputs`` (vLLM's name and fields) takes one of a JSON schema, any JSON object, a
regular expression, a Lark grammar or a choice of strings, and turns it into an llguidance
grammar. The grammar text travels with the request to the workers
(``SamplingSpec.grammar``), where a matcher next to the sampler masks every token the grammar
does not allow (``worker/grammar.py``), drafts included.

llguidance was picked over xgrammar and outlines-core: it installs as one 8 MB wheel with no
dependencies (xgrammar 0.2.9 pulls in triton, about 1 GB), compiles a schema in milliseconds,
computes a 49k-token mask in ~0.3 ms on this CPU (about 1% of a decode step) and rolls back
consumed tokens, which rejected drafts need.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

# JSON is written the way json.dumps writes it (models imitate that layout): free whitespace
# would let a weak model fill max_tokens with spaces inside a still-open object
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


@dataclass(frozen=True)
class StructuredOutputs:
    json: str | dict | None = None  # a JSON schema (object or its text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    grammar: str | None = None  # Lark syntax (llguidance's dialect, which embeds %json {...})
    choice: tuple[str, ...] | None = None  # exactly one of these strings

    def __post_init__(self) -> None:
        given = [self.json is not None, self.json_object, self.regex is not None,
                 self.grammar is not None, self.choice is not None]
        if sum(given) != 1:
            raise ValueError("structured output takes exactly one of json, json_object, regex, "
                             "grammar or choice")
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("choice must be a non-empty list of strings")
        if isinstance(self.json, dict):  # frozen and hashable: keep the schema as text
            object.__setattr__(self, "json", json.dumps(self.json))  # key order is generation order

    def to_grammar(self) -> str:
        """The llguidance grammar of this constraint (not yet checked: see ``check``)."""
        from llguidance import LLMatcher

        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not JSON: {e}") from None
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)


def lark_json(schema: dict[str, Any]) -> str:
    """A JSON schema as a Lark rule body (``%json {...}``, in ``JSON_LAYOUT``), to embed in
    larger grammars."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT})


class GrammarChecker:
    """Checks grammars on the driver (a bad schema is the caller's ValueError, not a worker
    failure); the llguidance tokenizer is built once, on first use."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._hf, self._vocab = tokenizer, vocab_size
        self._tok = None
        self._lock = threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                self._tok = ll_tokenizer(self._hf, self._vocab)
            return self._tok

    def check(self, grammar: str) -> None:
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, self.tokenizer())
        if error:
            raise ValueError(f"the structured-output constraint is not valid: {error}")


def ll_tokenizer(hf_tokenizer, vocab_size: int):
    """llguidance's view of a Hugging Face tokenizer over the model's vocabulary (which may be
    padded past the tokenizer's own ids; those are never allowed)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
