"""Tool-call parsers: the text a model family writes when it calls tools, into OpenAI tool calls.

Each parser is a small class registered by name (``--tool-call-parser``). ``scan(text)`` finds
where plain content ends and which calls follow; ``final=False`` is a prefix of the output seen
while streaming, where the last call may still be open (its name known, its arguments not).
``ToolCallStream`` turns successive scans into ``delta.tool_calls`` fragments: the call's id,
type and name once the name is known, then its arguments once they are complete, so the
fragments of a stream join to exactly the non-streamed calls.

Formats (as each family's chat template asks the model to write them):
- ``hermes`` (Hermes, Qwen 2.5 / 3, the ChatML tool template shipped here):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated.
- ``llama3_json`` (Llama 3.1-3.3): the whole answer is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several joined by ``;``.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, or from v11 tokenizers
  ``[TOOL_CALLS]name[ARGS]{...}`` per call.
- ``deepseek_v3`` (V3 / R1): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
  \\n```json\\n{...}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``; ``deepseek_v31`` (V3.1 and later,
  V4 included): ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from dist_engine.engine.structured import lark_json
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


def _args(value) -> str | None:
    """The arguments as the JSON text OpenAI sends (an object), or None if not an object."""
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _object(text: str, start: int) -> tuple[dict | None, int]:
    """The JSON value at ``text[start:]`` (after whitespace) and where it ends; (None, -1) if
    it is incomplete or not JSON."""
    i = len(text) - len(text[start:].lstrip())
    try:
        value, end = _DECODER.raw_decode(text, i)
    except json.JSONDecodeError:
        return None, -1
    return value, end


_NAME_RE = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _partial_name(text: str) -> str | None:
    m = _NAME_RE.search(text)
    return json.loads(f'"{m.group(1)}"') if m else None


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()  # a tool-call section starts with one of these
    needs_special_tokens = False  # its markers are special tokens the detokenizer must keep

    def scan(self, text: str, final: bool) -> Scan:
        raise NotImplementedError

    def grammar(self, tools: list[dict], name: str | None, parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) that admits only calls in this format: of the
        function ``name``, or of any of ``tools`` (``tool_choice`` required)."""
        raise ValueError(f"tool_choice 'required' or a named function is not enforced for the "
                         f"{self.name!r} format; use 'auto'")

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


def call_schema(tools: list[dict], name: str | None, args_key: str = "arguments") -> dict:
    """JSON schema of one call object: {"name": <a tool's name>, "arguments": <its parameters>}."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is None or fn["name"] == name:
            options.append({"type": "object", "additionalProperties": False,
                            "required": ["name", args_key],
                            "properties": {"name": {"const": fn["name"]},
                                           args_key: fn.get("parameters") or {"type": "object"}}})
    return options[0] if len(options) == 1 else {"anyOf": options}


@register
class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)

    def grammar(self, tools: list[dict], name: str | None, parallel: bool) -> str:
        more = ' ("\\n" call)*' if parallel and name is None else ""
        return (f"start: call{more}\n"
                'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
                f"body: {lark_json(call_schema(tools, name))}\n")

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find("<tool_call>")
        if start < 0:
            return Scan(len(text) if final else self._hold(text))
        out = Scan(start)
        for m in self._CALL.finditer(text, start):
            body, closed = m.group(1), bool(m.group(2))
            value, _ = _object(body, 0)
            if isinstance(value, dict) and (closed or final):
                out.calls.append((value.get("name"), _args(value.get("arguments", {}))))
            elif not final:
                out.calls.append((_partial_name(body), None))
            else:
                out.calls.append((None, None))
        return out


@register
class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")

    def grammar(self, tools: list[dict], name: str | None, parallel: bool) -> str:
        more = ' ("; " call)*' if parallel and name is None else ""
        return (f"start: call{more}\n"
                f"call: {lark_json(call_schema(tools, name, 'parameters'))}\n")

    def scan(self, text: str, final: bool) -> Scan:
        body = text.lstrip()
        lead = len(text) - len(body)
        if body.startswith("<|python_tag|>"):
            lead += len("<|python_tag|>")
        elif not final and "<|python_tag|>".startswith(body):
            return Scan(0)  # nothing yet, or the tag's beginning
        elif not body.startswith("{"):
            return Scan(len(text))  # a call only opens the answer
        out, i = Scan(0), lead
        while i < len(text):
            value, end = _object(text, i)
            if value is None:
                if final:
                    return Scan(len(text)) if not out.calls else Scan(0, out.calls + [(None, None)])
                out.calls.append((_partial_name(text[i:]), None))
                return out
            if not isinstance(value, dict) or "name" not in value:
                return Scan(len(text))  # JSON, but not a call: it is the answer
            out.calls.append((value["name"], _args(value.get("parameters", value.get("arguments", {})))))
            rest = text[end:].lstrip()
            if not rest.startswith(";"):
                break
            i = len(text) - len(rest) + 1
        return out


@register
class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    needs_special_tokens = True

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return Scan(len(text) if final else self._hold(text))
        out, body = Scan(start), text[start + len("[TOOL_CALLS]"):]
        if body.lstrip().startswith("["):  # one JSON list of calls
            value, _ = _object(body, 0)
            if isinstance(value, list):
                out.calls = [(c.get("name"), _args(c.get("arguments", {}))) if isinstance(c, dict)
                             else (None, None) for c in value]
            else:
                out.calls = [(None, None)] if final else [(_partial_name(body), None)]
            return out
        for part in body.split("[TOOL_CALLS]"):  # name[ARGS]{...} per call
            name, sep, args = part.partition("[ARGS]")
            value, _ = _object(args, 0) if sep else (None, -1)
            if value is not None:
                out.calls.append((name.strip(), _args(value)))
            else:
                out.calls.append((name.strip() if sep or final else None, None))
        return out


@register
class DeepSeekV3Parser(ToolParser):
    name = "deepseek_v3"
    markers = ("<｜tool▁calls▁begin｜>",)
    needs_special_tokens = True
    _CALL = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)(<｜tool▁call▁end｜>|$)", re.S)

    def _call(self, head: str, body: str) -> tuple[str | None, str | None]:
        name = head.strip()
        if name == "function":  # V3: NAME\n```json\n{...}\n```; the name ends at the newline
            if "\n" not in body:
                return None, None
            name, body = body.split("\n", 1)
            name, body = name.strip(), body.strip().removeprefix("```json").removesuffix("```")
        value, _ = _object(body, 0)
        return name, (_args(value) if value is not None else None)

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find(self.markers[0])
        if start < 0:
            return Scan(len(text) if final else self._hold(text))
        out = Scan(start)
        for m in self._CALL.finditer(text, start):
            name, args = self._call(m.group(1), m.group(2))
            complete = bool(m.group(3)) or final
            out.calls.append((name or None, args if complete else None))
        return out


@register
class DeepSeekV31Parser(DeepSeekV3Parser):
    name = "deepseek_v31"


DETECT = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
          ("<｜tool▁sep｜>function", "deepseek_v3"), ("<｜tool▁calls▁begin｜>", "deepseek_v31"),
          ("<|python_tag|>", "llama3_json"))


def detect(template: str | None) -> str | None:
    """The parser a chat template's own tool markers point to (None if it has none)."""
    for marker, name in DETECT:
        if template and marker in template:
            return name
    return None


def get_parser(name: str) -> ToolParser:
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
