"""Tool-call parsers: the text a model family writes when it calls tools, into OpenAI tool calls
(``base.py``: the shared parts; one module per family of formats registers its parsers)."""

from __future__ import annotations

from dist_engine.server.openai.tool_parsers import deepseek, json_formats  # noqa: F401 - register
from dist_engine.server.openai.tool_parsers.base import (
    PARSERS,
    Terminals,
    ToolCallStream,
    ToolParser,
    get_parser,
)

__all__ = ["PARSERS", "Terminals", "ToolCallStream", "ToolParser", "detect", "get_parser"]

# a template's own tool markers, most specific first (DeepSeek's V3 template names the
# "function" type before its separator; V3.1 and later do not)
DETECT = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
          ("<｜DSML｜tool_calls>", "deepseek_v4"), ("<｜DSML｜function_calls>", "deepseek_v32"),
          ("<｜tool▁sep｜>function", "deepseek_v3"), ("<｜tool▁calls▁begin｜>", "deepseek_v31"),
          ("<|python_tag|>", "llama3_json"))


def detect(template: str | None) -> str | None:
    """The parser a chat template's own tool markers point to (None if it has none)."""
    for marker, name in DETECT:
        if template and marker in template:
            return name
    return None
