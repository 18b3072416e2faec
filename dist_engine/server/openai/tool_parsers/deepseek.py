"""DeepSeek's tool-call formats, as each generation's chat template (or encoder) writes them.

- ``deepseek_v3`` (V3, R1): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
  \\n```json\\n{...}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``.
- ``deepseek_v31`` (V3.1): ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`` inside the
  same ``calls`` markers (the scan reads both layouts).
- ``deepseek_v32`` (V3.2) and ``deepseek_v4`` (V4) write DSML, an XML-like markup, one
  parameter per element; ``string="true"`` holds raw text, ``"false"`` a JSON value::

      <｜DSML｜function_calls>            (V4: <｜DSML｜tool_calls>)
      <｜DSML｜invoke name="get_weather">
      <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
      </｜DSML｜invoke>
      </｜DSML｜function_calls>
"""

from __future__ import annotations

import json
import re

from dist_engine.engine.structured import lark_json
from dist_engine.server.openai.tool_parsers.base import (
    Scan,
    Terminals,
    ToolParser,
    args_text,
    json_at,
    one_of,
    quote,
    register,
    tools_named,
)

BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, SEP, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"


def _params(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object"}


@register
class DeepSeekV3Parser(ToolParser):
    name = "deepseek_v3"
    markers = (BEGIN,)
    needs_special_tokens = True
    _CALL = re.compile(f"{CALL_BEGIN}(.*?){SEP}(.*?)({CALL_END}|\\Z)", re.S)

    def _call(self, head: str, body: str) -> tuple[str | None, str | None]:
        name = head.strip()
        if name == "function":  # V3: NAME\n```json\n{...}\n```; the name ends at the newline
            if "\n" not in body:
                return None, None
            name, body = body.split("\n", 1)
            name, body = name.strip(), body.strip().removeprefix("```json").removesuffix("```")
        value, _ = json_at(body, 0)
        return name, (args_text(value) if value is not None else None)

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

    def _function(self, fn: dict, t: Terminals) -> str:
        return (f'"function" {t(SEP)} {quote(fn["name"] + chr(10) + "```json" + chr(10))} '
                f'{lark_json(_params(fn))} "\\n```" {t(CALL_END)}')

    def grammar(self, tools: list[dict], name: str | None, parallel: bool, t: Terminals) -> str:
        fns = tools_named(tools, name)
        more = " call*" if parallel and name is None else ""
        return (f"start: {t(BEGIN)} call{more} {t(END)}\n"
                f"call: {t(CALL_BEGIN)} ({one_of([f'fn_{i}' for i in range(len(fns))])})\n"
                + "".join(f"fn_{i}: {self._function(fn, t)}\n" for i, fn in enumerate(fns)))


@register
class DeepSeekV31Parser(DeepSeekV3Parser):
    name = "deepseek_v31"

    def _function(self, fn: dict, t: Terminals) -> str:
        return f"{quote(fn['name'])} {t(SEP)} {lark_json(_params(fn))} {t(CALL_END)}"


def _value(text: str, is_string: bool):
    if is_string:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # a model's unquoted text where JSON was announced
        return text


@register
class DeepSeekV32Parser(ToolParser):
    name = "deepseek_v32"
    markers = ("<｜DSML｜function_calls>",)
    needs_special_tokens = True
    _INVOKE = re.compile(r'<｜DSML｜invoke\s+name="([^"]*)"\s*>(.*?)(</｜DSML｜invoke>|\Z)', re.S)
    _PARAM = re.compile(r'<｜DSML｜parameter\s+name="([^"]*)"\s+string="(true|false)"\s*>(.*?)'
                        r"</｜DSML｜parameter>", re.S)

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find(self.markers[0])
        if start < 0:
            return Scan(len(text) if final else self._hold(text))
        out = Scan(start)
        for m in self._INVOKE.finditer(text, start):
            if not m.group(3):  # still open: its name is known, its arguments are not
                out.calls.append((m.group(1) if not final else None, None))
                continue
            args = {k: _value(v, s == "true") for k, s, v in self._PARAM.findall(m.group(2))}
            out.calls.append((m.group(1), json.dumps(args, ensure_ascii=False)))
        return out

    def grammar(self, tools: list[dict], name: str | None, parallel: bool, t: Terminals) -> str:
        """Every parameter as JSON (``string="false"``), in the schema's order; required ones
        always, the others optionally."""
        fns = tools_named(tools, name)
        more = " invoke*" if parallel and name is None else ""
        open_, close = self.markers[0], self.markers[0].replace("<", "</", 1)
        rules = [f'start: {t(open_)} "\\n" invoke{more} {t(close)}',
                 f"invoke: {one_of([f'fn_{i}' for i in range(len(fns))])}"]
        for i, fn in enumerate(fns):
            schema = _params(fn)
            required = set(schema.get("required", ()))
            params = []
            for j, (key, sub) in enumerate(schema.get("properties", {}).items()):
                tag = quote("<｜DSML｜parameter name=" + json.dumps(key) + ' string="false">')
                rules.append(f'p_{i}_{j}: {tag} {lark_json(sub)} "</｜DSML｜parameter>\\n"')
                params.append(f"p_{i}_{j}" + ("" if key in required else "?"))
            head = quote("<｜DSML｜invoke name=" + json.dumps(fn["name"]) + ">\n")
            rules.append(f'fn_{i}: {head} {" ".join(params)} "</｜DSML｜invoke>\\n"')
        return "\n".join(rules) + "\n"


@register
class DeepSeekV4Parser(DeepSeekV32Parser):
    name = "deepseek_v4"
    markers = ("<｜DSML｜tool_calls>",)
