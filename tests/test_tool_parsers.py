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
    "deepseek_v32": [
        ('Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
         '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
         '<｜DSML｜parameter name="unit" string="false">"celsius"</｜DSML｜parameter>\n'
         '</｜DSML｜invoke>\n<｜DSML｜invoke name="get_time">\n'
         '<｜DSML｜parameter name="tz" string="true">Europe/Paris</｜DSML｜parameter>\n'
         '</｜DSML｜invoke>\n</｜DSML｜function_calls>', "Checking.\n\n",
         [("get_weather", WEATHER), ("get_time", TIME)]),
    ],
    "deepseek_v4": [
        ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
         '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
         '<｜DSML｜parameter name="unit" string="true">celsius</｜DSML｜parameter>\n'
         '</｜DSML｜invoke>\n</｜DSML｜tool_calls>', None, [("get_weather", WEATHER)]),
        ("No call: <｜DSML｜ is just text here.", "No call: <｜DSML｜ is just text here.", []),
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
    assert detect("{{ '<｜DSML｜tool_calls>' }}") == "deepseek_v4"
    assert detect("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{{ name }}<｜tool▁sep｜>") == "deepseek_v31"
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


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                       "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {
            "type": "object", "additionalProperties": False, "required": ["tz"],
            "properties": {"tz": {"enum": ["UTC", "CET"]}}}}}]


def _valid_call(name: str, arguments: str) -> None:
    fn = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name]
    args = json.loads(arguments)
    assert set(fn["required"]) <= set(args) <= set(fn["properties"]), arguments
    assert all(v in fn["properties"][k]["enum"] for k, v in args.items()), arguments


def test_every_format_guarantees_calls_from_a_random_model(tiny_chat_model):
    """tool_choice required (parallel calls allowed) and a named function, through each parser's
    grammar on a random model: every answer parses into valid calls of the allowed tools."""
    from dist_engine import LLM, SamplingParams
    from dist_engine.engine.structured import StructuredOutputs
    from dist_engine.server.openai.tool_parsers import PARSERS, Terminals

    choices = [(None, True), ("get_time", False)]
    with LLM(tiny_chat_model, max_model_len=512, num_kv_blocks=1024, block_size=16) as llm:
        ids = llm.apply_chat_template([{"role": "user", "content": "Weather and time in Paris?"}])
        t = Terminals(llm.tokenizer)
        cases = [(name, named, parallel) for name in sorted(PARSERS) for named, parallel in choices]
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=160, skip_special_tokens=False,
                                 structured_outputs=StructuredOutputs(
                                     grammar=get_parser(name).grammar(TOOLS, named, parallel, t)))
                  for i, (name, named, parallel) in enumerate(cases)]
        outs = llm.generate(prompt_token_ids=[ids] * len(cases), sampling_params=params)
    counts = []
    for (name, named, parallel), out in zip(cases, outs):
        c = out.outputs[0]
        parser = get_parser(name)
        if c.finish_reason == "length":  # a random model may chain parallel calls past max_tokens
            assert parallel, (name, c.text)
            done = [n for n, a in parser.scan(c.text, final=False).calls if a is not None]
            assert len(done) >= 2, (name, c.text)
            counts.append(len(done))
            continue
        assert c.finish_reason == "stop", (name, c.text)
        content, calls = parser.parse(c.text)
        assert content is None and calls, (name, c.text)
        for call in calls:
            assert named in (None, call.function.name), (name, c.text)
            _valid_call(call.function.name, call.function.arguments)
        assert parallel or len(calls) == 1, (name, c.text)  # named: one call of that tool
        counts.append(len(calls))
    assert max(counts) > 1  # parallel grammars do produce several calls


def test_markers_that_are_special_tokens_are_written_as_those_tokens(tiny_chat_model):
    """With a tokenizer that has "[TOOL_CALLS]" as one special token, the grammar asks for that
    token (as a Mistral model writes it), not for its spelling in text pieces."""
    from llguidance import LLMatcher
    from transformers import AutoTokenizer

    from dist_engine.engine.structured import ll_tokenizer
    from dist_engine.server.openai.tool_parsers import Terminals

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    special = tok.convert_tokens_to_ids("[TOOL_CALLS]")
    grammar = get_parser("mistral").grammar(TOOLS, "get_time", False, Terminals(tok))
    assert f"<[{special}]>" in grammar
    body = tok.encode('[{"name": "get_time", "arguments": {"tz": "UTC"}}]', add_special_tokens=False)
    spelled = tok.encode("[TOOL_CALLS]", add_special_tokens=False, split_special_tokens=True)
    lt = ll_tokenizer(tok, len(tok))
    for prefix, ok in (([special], True), (spelled, False)):
        m = LLMatcher(lt, grammar)
        accepted = all(m.consume_token(i) for i in prefix + body)
        assert accepted == ok and (m.is_accepting() or not ok), prefix


def test_responses_stream_carries_reasoning_as_typed_events():
    """/v1/responses streaming with a reasoning parser: the reasoning item and its
    reasoning_text deltas, then the message, every event valid for the openai SDK's types."""
    import asyncio
    from types import SimpleNamespace

    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from dist_engine.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from dist_engine.server.openai import chat, responses
    from dist_engine.server.openai.serving import Context

    ctx = Context(SimpleNamespace(name="m"), None, None, False, "deepseek_r1", None)
    pieces = ["Two and ", "two.</th", "ink>\n\nIt is", " 4."]

    async def stream():
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            c = CompletionOutput(0, "".join(pieces[:i + 1]), list(range(i + 1)), text_delta=piece,
                                 finish_reason="stop" if last else None)
            yield RequestOutput("r", None, [1, 2], [c], last, RequestMetrics(0.0))

    async def collect():
        plan = chat.Plan(tools=None, parser=None, reasoning=True)
        req = responses.ResponsesRequest(input="What is two and two?")
        return [e async for e in responses._events(ctx, req, plan, "resp-1", stream())]

    adapter = TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_json(e.split("data: ", 1)[1]) for e in asyncio.run(collect())]
    kinds = [e.type for e in events]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Two and two."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "It is 4."
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    done = events[-1].response
    assert [o.type for o in done.output] == ["reasoning", "message"]
    assert done.output[0].content[0].text == "Two and two." and done.output_text == "It is 4."
