"""Tool-call and reasoning parsers on model-shaped texts, whole and streamed in two fragments at
every split point: the fragments must join to exactly the non-streamed result."""

from __future__ import annotations

import json

import pytest

from dist_engine.server.openai.reasoning import ReasoningStream, get_reasoning_parser
from dist_engine.server.openai.tool_parsers import ToolCallStream, detect, get_parser

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"tz": "Europe/Paris"}
CASES = {
    "hermes": [
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
         '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
         '{"tz": "Europe/Paris"}}\n</tool_call>', "Let me check.\n",
         [("get_weather", WEATHER), ("get_time", TIME)]),
        ('<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
         None, [("get_time", TIME)]),
        ("No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
         [("get_weather", WEATHER)]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
         '"celsius"}}; {"name": "get_time", "parameters": {"tz": "Europe/Paris"}}', None,
         [("get_weather", WEATHER), ("get_time", TIME)]),
        ("The weather is fine {mostly}.", "The weather is fine {mostly}.", []),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
         '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]', None,
         [("get_weather", WEATHER), ("get_time", TIME)]),
        ('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', "Sure. ",
         [("get_weather", WEATHER)]),
    ],
    "deepseek_v3": [
        ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
         '{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None,
         [("get_weather", WEATHER)]),
    ],
    "deepseek_v31": [
        ('Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", '
         '"unit": "celsius"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"tz": '
         '"Europe/Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "Checking.",
         [("get_weather", WEATHER), ("get_time", TIME)]),
    ],
}


def _joined(parser_name: str, pieces: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    stream = ToolCallStream(get_parser(parser_name))
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        text, frags = stream.feed(piece, final=i == len(pieces) - 1)
        content += text
        for f in frags:
            entry = calls.setdefault(f.index, {"id": None, "name": None, "arguments": ""})
            if f.id:
                assert entry["id"] is None, "a call's id is sent once"
                entry["id"] = f.id
            if f.function.name:
                entry["name"] = f.function.name
            entry["arguments"] += f.function.arguments or ""
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("name", sorted(CASES))
def test_tool_parsers_whole_and_streamed_at_every_split(name):
    parser = get_parser(name)
    for text, content, calls in CASES[name]:
        got_content, got_calls = parser.parse(text)
        assert got_content == content, text
        assert [(c.function.name, json.loads(c.function.arguments)) for c in got_calls] == calls
        for cut in range(len(text) + 1):
            joined_content, joined_calls = _joined(name, [text[:cut], text[cut:]])
            assert joined_content == (content or ""), (cut, text)
            assert joined_calls == calls, (cut, text)
        # and token-sized fragments of 3 characters
        assert _joined(name, [text[i:i + 3] for i in range(0, len(text), 3)] or [""]) == (content or "", calls)


def test_malformed_call_stays_content_and_detection():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert get_parser("hermes").parse(text) == (text, [])
    assert detect("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert detect("[TOOL_CALLS]") == "mistral" and detect("plain {{ messages }}") is None
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        get_parser("llama2")


@pytest.mark.parametrize("name,text,reasoning,content", [
    ("deepseek_r1", "Let me think: 2+2.</think>\n\nIt is 4.", "Let me think: 2+2.", "It is 4."),
    ("deepseek_r1", "still thinking", "still thinking", None),
    ("qwen3", "<think>\nShort.\n</think>\n\nAnswer.", "\nShort.\n", "Answer."),
    ("qwen3", "No thinking here.", None, "No thinking here."),
])
def test_reasoning_parsers_whole_and_streamed(name, text, reasoning, content):
    parser = get_reasoning_parser(name)
    r, c, _ = parser.split(text)
    assert (r, c) == (reasoning, content)
    for cut in range(len(text) + 1):
        s = ReasoningStream(parser)
        r1, c1 = s.feed(text[:cut], False)
        r2, c2 = s.feed(text[cut:], True)
        assert (r1 + r2, c1 + c2) == (reasoning or "", content or ""), cut
