"""Formats whose calls are JSON objects.

- ``hermes`` (Hermes, Qwen 2.5 / 3, the ChatML tool template shipped here):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated.
- ``llama3_json`` (Llama 3.1-3.3): the whole answer is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several joined by ``;``.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, or from v11 tokenizers
  ``[TOOL_CALLS]name[ARGS]{...}`` per call (the grammar writes the list).
"""

from __future__ import annotations

import re

from dist_engine.engine.structured import lark_json
from dist_engine.server.openai.tool_parsers.base import (
    Scan,
    Terminals,
    ToolParser,
    args_text,
    call_schema,
    json_at,
    partial_name,
    register,
)


@register
class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)

    def grammar(self, tools: list[dict], name: str | None, parallel: bool, t: Terminals) -> str:
        more = ' ("\\n" call)*' if parallel and name is None else ""
        return (f"start: call{more}\n"
                f'call: {t("<tool_call>")} "\\n" body "\\n" {t("</tool_call>")}\n'
                f"body: {lark_json(call_schema(tools, name))}\n")

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find("<tool_call>")
        if start < 0:
            return Scan(len(text) if final else self._hold(text))
        out = Scan(start)
        for m in self._CALL.finditer(text, start):
            body, closed = m.group(1), bool(m.group(2))
            value, _ = json_at(body, 0)
            if isinstance(value, dict) and (closed or final):
                out.calls.append((value.get("name"), args_text(value.get("arguments", {}))))
            elif not final:
                out.calls.append((partial_name(body), None))
            else:
                out.calls.append((None, None))
        return out


@register
class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")

    def grammar(self, tools: list[dict], name: str | None, parallel: bool, t: Terminals) -> str:
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
            value, end = json_at(text, i)
            if value is None:
                if final:
                    return Scan(len(text)) if not out.calls else Scan(0, out.calls + [(None, None)])
                out.calls.append((partial_name(text[i:]), None))
                return out
            if not isinstance(value, dict) or "name" not in value:
                return Scan(len(text))  # JSON, but not a call: it is the answer
            out.calls.append((value["name"], args_text(value.get("parameters", value.get("arguments", {})))))
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

    def grammar(self, tools: list[dict], name: str | None, parallel: bool, t: Terminals) -> str:
        more = ' (", " call)*' if parallel and name is None else ""
        return (f'start: {t("[TOOL_CALLS]")} "[" call{more} "]"\n'
                f"call: {lark_json(call_schema(tools, name))}\n")

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return Scan(len(text) if final else self._hold(text))
        out, body = Scan(start), text[start + len("[TOOL_CALLS]"):]
        if body.lstrip().startswith("["):  # one JSON list of calls
            value, _ = json_at(body, 0)
            if isinstance(value, list):
                out.calls = [(c.get("name"), args_text(c.get("arguments", {}))) if isinstance(c, dict)
                             else (None, None) for c in value]
            else:
                out.calls = [(None, None)] if final else [(partial_name(body), None)]
            return out
        for part in body.split("[TOOL_CALLS]"):  # name[ARGS]{...} per call
            name, sep, args = part.partition("[ARGS]")
            value, _ = json_at(args, 0) if sep else (None, -1)
            if value is not None:
                out.calls.append((name.strip(), args_text(value)))
            else:
                out.calls.append((name.strip() if sep or final else None, None))
        return out
