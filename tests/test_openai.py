"""The OpenAI-compatible HTTP API on a real server process on loopback, through the official
``openai`` client (sync and async): a tiny random model over the default model's tokenizer."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest
from test_grpc import free_port, start_server

from dist_engine.client import Client

pytestmark = pytest.mark.slow
KEY = "sk-test-1"
MSGS = [{"role": "user", "content": "Name three colours."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    port = free_port()
    proc, target, metrics_port = start_server(
        tiny_chat_model, "--http-port", str(port), "--api-key", KEY, "--max-model-len", "512",
        "--max-queued-requests", "8", "--max-message-bytes", "256KiB", "--enable-auto-tool-choice",
        tokenizer=True)
    yield f"http://127.0.0.1:{port}", target
    proc.terminate()
    assert proc.wait(timeout=60) == 0


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def _joined_chat(chunks) -> tuple[str, list, object]:
    text, finish, usage = "", [], None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    return text, finish, usage


def test_streaming_joins_to_the_whole_answer(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw)
    text, finish, usage = _joined_chat(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert text == whole.choices[0].message.content and len(text) > 0
    assert finish == [whole.choices[0].finish_reason]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: prefix hits
    c = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0)
    joined = "".join(x.choices[0].text for x in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0, stream=True))
    assert joined == c.choices[0].text and c.usage.completion_tokens == 20 or c.choices[0].finish_reason == "stop"


def test_n_seed_logprobs_and_echo(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=12, temperature=1.0, seed=7, n=2,
              logprobs=True, top_logprobs=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    lp = a.choices[0].logprobs.content
    assert len(lp) == 12 and all(t.logprob <= 0 and len(t.top_logprobs) >= 1 for t in lp)
    e = client.completions.create(model="tiny", prompt="The sky is blue", max_tokens=0, echo=True,
                                  logprobs=1)
    ch = e.choices[0]
    assert ch.text == "The sky is blue" and ch.logprobs.token_logprobs[0] is None
    assert len(ch.logprobs.tokens) == e.usage.prompt_tokens and e.usage.completion_tokens == 0
    assert all(x < 0 for x in ch.logprobs.token_logprobs[1:])
    ids = client.post("/../tokenize", body={"prompt": "The sky is blue"}, cast_to=object)["tokens"]
    assert client.post("/../detokenize", body={"tokens": ids}, cast_to=object)["prompt"] == "The sky is blue"


def test_async_client_concurrent_streams(server):
    async def go():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0) as c:
            async def one(seed):
                s = await c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10,
                                                    temperature=0.8, seed=seed, stream=True)
                return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
            streamed = await asyncio.gather(*(one(i) for i in range(4)))
            whole = [(await c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10,
                                                      temperature=0.8, seed=i)).choices[0].message.content
                     for i in range(4)]
            return streamed, whole
    streamed, whole = asyncio.run(go())
    assert streamed == whole


def test_each_error_class(server, client):
    base = dict(model="tiny", messages=MSGS, max_tokens=4)
    for kw in (dict(temperature=5), dict(messages=[{"role": "hacker", "content": "x"}]),
               dict(n=100, temperature=1), dict(max_tokens=4000), dict(top_logprobs=3),
               dict(tool_choice="required"), dict(logit_bias={"x": 1})):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{**base, **kw})
        assert e.value.status_code == 400 and e.value.body["message"], kw
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**{**base, "model": "gpt-9"})
    with openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with pytest.raises(openai.APIStatusError) as e:  # over --max-message-bytes (256 KiB)
        client.completions.create(model="tiny", prompt="x" * 300_000, max_tokens=1)
    assert e.value.status_code == 413
    # 8 places: an n=8 stream holds them all, so the next request is 429
    held = client.chat.completions.create(**{**base, "n": 8, "temperature": 1, "max_tokens": 200,
                                             "stream": True})
    next(iter(held))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**base)
    held.close()
    assert client.models.list().data[0].max_model_len == 512  # still serving


def _wait_drained(target: str) -> object:
    with Client(target, api_key=KEY) as g:
        for _ in range(100):
            s = g.stats()
            if s.kv_cache_usage == 0.0 and s.num_requests_running == 0:
                return s
            time.sleep(0.05)
    raise AssertionError(f"blocks still in use: {s}")


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, client):
    before = _wait_drained(server[1]).requests_aborted_total
    for kind in ("chat", "completion"):
        if kind == "chat":
            s = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=200,
                                               stream=True, extra_body={"ignore_eos": True})
        else:
            s = client.completions.create(model="tiny", prompt="Hello", max_tokens=200, stream=True,
                                          extra_body={"ignore_eos": True})
        it = iter(s)
        for _ in range(3):
            next(it)
        s.close()
    with pytest.raises(openai.APITimeoutError):  # a non-streamed request whose client gives up
        client.with_options(timeout=0.5).completions.create(
            model="tiny", prompt="Hello", max_tokens=400, extra_body={"ignore_eos": True})
    assert _wait_drained(server[1]).requests_aborted_total == before + 3


def test_tool_choice_and_response_format_are_guaranteed_by_the_grammar(client):
    """A random model cannot be trusted to call a tool or write JSON: the grammar does it."""
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
            tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=1.0,
            seed=seed)
        (call,) = r.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
        assert args["city"] in ("Paris", "Rome", "Oslo") and set(args) == {"city", "unit"}
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
              "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}}}
    r = client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=40, temperature=1.0, seed=1, n=4,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    for c in r.choices:
        value = json.loads(c.message.content)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
    with pytest.raises(openai.BadRequestError, match="not valid"):
        client.chat.completions.create(model="tiny", messages=MSGS, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})


def test_responses_api(client):
    kw = dict(model="tiny", input="Say hi", max_output_tokens=16, temperature=0)
    whole = client.responses.create(**kw)
    streamed, done = "", None
    for ev in client.responses.create(**kw, stream=True):
        if ev.type == "response.output_text.delta":
            streamed += ev.delta
        if ev.type == "response.completed":
            done = ev.response
    assert streamed == whole.output_text == done.output_text and whole.usage.output_tokens > 0
    r = client.responses.create(model="tiny", input="Weather in Rome?", max_output_tokens=60,
                                tools=[{"type": "function", **WEATHER["function"]}],
                                tool_choice="required", parallel_tool_calls=False)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Rome", "Oslo")


def test_health_metrics_version_open(server):
    base = server[0]
    assert urllib.request.urlopen(base + "/health", timeout=10).status == 200
    assert "version" in json.loads(urllib.request.urlopen(base + "/version", timeout=10).read())
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    assert 'dist_engine:request_rejected_total{reason="invalid_argument"}' in text
    assert 'dist_engine:request_rejected_total{reason="unauthenticated"}' in text


def test_sigterm_drains_http(tiny_models):
    """SIGTERM: /health turns 503, new calls get 503, the running stream finishes whole, exit 0."""
    port = free_port()
    proc, _, _ = start_server(tiny_models("llama"), "--http-port", str(port), "--drain-seconds", "60")
    base = f"http://127.0.0.1:{port}"
    with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0) as c:
        s = iter(c.completions.create(model="tiny", prompt=[1, 17, 230, 45], max_tokens=60,
                                      stream=True, stream_options={"include_usage": True},
                                      extra_body={"ignore_eos": True}))
        got = [next(s)]
        proc.send_signal(signal.SIGTERM)
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
            except urllib.error.HTTPError as e:
                assert e.code == 503
                break
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="tiny", prompt=[1, 2], max_tokens=2)
        assert e.value.status_code == 503
        got += list(s)  # (no tokenizer: the text is empty, the usage counts the tokens)
        assert [x.choices[0].finish_reason for x in got if x.choices][-1] == "length"
        assert got[-1].usage.completion_tokens == 60
    assert proc.wait(timeout=60) == 0
