"""Reasoning parsers: a thinking model's ``<think>...</think>`` text into ``reasoning_content``.

Registered by name (``--reasoning-parser``):
- ``deepseek_r1``: the chat template opens ``<think>`` in the prompt, so the output is reasoning
  until ``</think>`` (all of it if the model never closes it).
- ``qwen3``: reasoning only where the output opens ``<think>`` itself; without it (thinking off,
  ``chat_template_kwargs={"enable_thinking": false}``) everything is content.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


class ReasoningParser:
    name = ""
    implicit_start = False  # the prompt already opened the thinking block

    def split(self, text: str, final: bool = True) -> tuple[str | None, str | None, int]:
        """(reasoning, content, held): ``held`` trailing characters may still become a
        marker, so a stream keeps them back."""
        body = text.lstrip() if not self.implicit_start else text
        opened = self.implicit_start or body.startswith(START)
        if not opened:
            if not final and START.startswith(body) and body:
                return None, None, len(text)  # maybe the start of <think>
            return None, text, 0
        if body.startswith(START):
            body = body[len(START):]
        end = body.find(END)
        if end < 0:
            held = 0 if final else _partial_suffix(body, END)
            return body[:len(body) - held], None, held
        content = body[end + len(END):]
        return body[:end], content.lstrip("\n") if content.strip() else None, 0


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class DeepSeekR1(ReasoningParser):
    name = "deepseek_r1"
    implicit_start = True


class Qwen3(ReasoningParser):
    name = "qwen3"


REASONING_PARSERS = {cls.name: cls for cls in (DeepSeekR1, Qwen3)}


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}")
    return REASONING_PARSERS[name]()


class ReasoningStream:
    """Streaming state of one choice: (reasoning delta, content delta) per text delta."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        self.text += delta
        reasoning, content, _ = self.parser.split(self.text, final)
        r, c = reasoning or "", content or ""
        out = (r[self.sent_reasoning:], c[self.sent_content:])
        self.sent_reasoning = max(self.sent_reasoning, len(r))
        self.sent_content = max(self.sent_content, len(c))
        return out
