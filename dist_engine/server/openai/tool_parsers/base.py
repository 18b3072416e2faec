"""What every tool-call parser shares: the scan result, the parser class and its registry, the
terminals its grammar writes markers with, and the streaming state that turns scans into
``delta.tool_calls`` fragments.

Each parser is a small class registered by name (``--tool-call-parser``). ``scan(text)`` finds
where plain content ends and which calls follow; ``final=False`` is a prefix of the output seen
while streaming, where the last call may still be open (its name known, its arguments not).
``ToolCallStream`` turns successive scans into fragments: the call's id, type and name once the
name is known, then its arguments once they are complete, so the fragments of a stream join to
exactly the non-streamed calls. ``grammar(...)`` is the Lark grammar (llguidance's dialect) that
admits only calls in the parser's format, which is how ``tool_choice`` ``required`` or a named
function is guaranteed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from dist_engine.server.openai.protocol import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    new_id,
)

_DECODER = json.JSONDecoder()


@dataclass
class Scan:
    content_end: int  # text[:content_end] is plain content
    calls: list[tuple[str | None, str | None]] = field(default_factory=list)  # (name, arguments)


def args_text(value) -> str | None:
    """The arguments as the JSON text OpenAI sends (an object), or None if not an object."""
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def json_at(text: str, start: int) -> tuple[dict | None, int]:
    """The JSON value at ``text[start:]`` (after whitespace) and where it ends; (None, -1) if
    it is incomplete or not JSON."""
    i = len(text) - len(text[start:].lstrip())
    try:
        value, end = _DECODER.raw_decode(text, i)
    except json.JSONDecodeError:
        return None, -1
    return value, end


_NAME_RE = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def partial_name(text: str) -> str | None:
    m = _NAME_RE.search(text)
    return json.loads(f'"{m.group(1)}"') if m else None


class Terminals:
    """Lark terminals for a format's markers: the special token itself where the tokenizer has
    the marker as one special token (as the model writes it, and as the detokenizer keeps it),
    else the marker's text."""

    def __init__(self, tokenizer=None) -> None:
        self.special = {} if tokenizer is None else {
            tok.content: i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}

    def __call__(self, text: str) -> str:
        i = self.special.get(text)
        return f"<[{i}]>" if i is not None else quote(text)


def quote(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def one_of(rules: list[str]) -> str:
    return " | ".join(rules)


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()  # a tool-call section starts with one of these
    needs_special_tokens = False  # its markers are special tokens the detokenizer must keep

    def scan(self, text: str, final: bool) -> Scan:
        raise NotImplementedError

    def grammar(self, tools: list[dict], name: str | None, parallel: bool, t: Terminals) -> str:
        """A Lark grammar that admits only calls in this format: of the function ``name``, or
        of any of ``tools`` (``tool_choice`` required); several calls only if ``parallel`` and
        no name. ``t`` writes the format's markers as the tokenizer has them."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished output; unparsable call text stays content."""
        s = self.scan(text, final=True)
        calls = [ToolCall(function=FunctionCall(name=n, arguments=a)) for n, a in s.calls
                 if n is not None and a is not None]
        if len(calls) < len(s.calls):  # a malformed call: hand the text back untouched
            return text, []
        content = text[:s.content_end]
        return (content if content.strip() else None), calls

    def _hold(self, text: str) -> int:
        """Where content must stop while streaming: before a marker, or a marker's prefix at
        the end of the text."""
        cut = min((i for i in (text.find(m) for m in self.markers) if i >= 0), default=len(text))
        for m in self.markers:
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    cut = min(cut, len(text) - k)
                    break
        return cut


PARSERS: dict[str, type[ToolParser]] = {}


def register(cls: type[ToolParser]) -> type[ToolParser]:
    PARSERS[cls.name] = cls
    return cls


def tools_named(tools: list[dict], name: str | None) -> list[dict]:
    """The tools' function definitions a call may use: all, or the one ``tool_choice`` names."""
    return [t["function"] for t in tools if name is None or t["function"]["name"] == name]


def call_schema(tools: list[dict], name: str | None, args_key: str = "arguments") -> dict:
    """JSON schema of one call object: {"name": <a tool's name>, "arguments": <its parameters>}."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", args_key],
                "properties": {"name": {"const": fn["name"]},
                               args_key: fn.get("parameters") or {"type": "object"}}}
               for fn in tools_named(tools, name)]
    return options[0] if len(options) == 1 else {"anyOf": options}


def get_parser(name: str) -> ToolParser:
    """The registered parser ``name`` (ValueError naming the known ones otherwise)."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(PARSERS))}")
    return PARSERS[name]()


class ToolCallStream:
    """Streaming state of one choice: content deltas until a call starts, then call fragments."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_content = 0
        self.sent: list[list] = []  # per call: [id, name sent, arguments sent]

    def feed(self, delta: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        self.text += delta
        s = self.parser.scan(self.text, final)
        if final and any(n is None or a is None for n, a in s.calls):
            s = Scan(len(self.text))  # malformed: it was content after all
        content = self.text[self.sent_content:s.content_end] if s.content_end > self.sent_content else ""
        self.sent_content = max(self.sent_content, s.content_end)
        frags = []
        for i, (name, args) in enumerate(s.calls):
            if name is None:
                break
            if i == len(self.sent):
                self.sent.append([new_id("call"), False, False])
            cid, name_sent, args_sent = self.sent[i]
            if not name_sent:
                frags.append(DeltaToolCall(index=i, id=cid, type="function",
                                           function=DeltaFunctionCall(name=name, arguments="")))
                self.sent[i][1] = True
            if args is not None and not args_sent:
                frags.append(DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=args)))
                self.sent[i][2] = True
        return content, frags

    @property
    def called(self) -> bool:
        return bool(self.sent)
