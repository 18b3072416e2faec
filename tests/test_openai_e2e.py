"""The default model behind the HTTP API: a tool-call round trip the grammar guarantees, and
lm-evaluation-harness (``local-completions``) scoring a local task, its loglikelihoods equal to
the engine's own prompt logprobs in-process."""

from __future__ import annotations

import json
import os

import openai
import pytest
from test_grpc import free_port, start_server

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
DATA = os.path.join(os.path.dirname(__file__), "data", "tiny_qa.jsonl")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc, _, _ = start_server(MODEL, "--http-port", str(port), "--enable-auto-tool-choice",
                              "--max-model-len", "1024", "--block-size", "16",
                              "--kv-cache-memory", "160MiB", "--served-model-name", MODEL,
                              tokenizer=True)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def test_tool_round_trip_on_the_default_model(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0) as c:
        messages = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
        first = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                          tool_choice="required", parallel_tool_calls=False,
                                          temperature=0, max_tokens=64)
        msg = first.choices[0].message
        (call,) = msg.tool_calls
        assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        messages += [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id,
                      "content": json.dumps({"temperature_c": 21, "sky": "sunny"})}]
        kw = dict(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                  temperature=0, max_tokens=48)
        answer = c.chat.completions.create(**kw).choices[0].message.content
        streamed = "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(**kw, stream=True) if ch.choices)
        assert streamed == answer and answer.strip()


def test_lm_eval_local_completions_matches_in_process_logprobs(server, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dist_engine import LLM, SamplingParams
    from dist_engine.weights.registry import resolve_model

    (tmp_path / "tiny_qa.yaml").write_text(
        "task: dist_engine_tiny_qa\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {DATA}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    path = resolve_model(MODEL)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": MODEL, "base_url": server + "/v1/completions", "tokenizer": path,
                    "tokenizer_backend": "huggingface", "tokenized_requests": True,
                    "num_concurrent": 2, "max_retries": 1},
        tasks=["dist_engine_tiny_qa"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    samples = out["samples"]["dist_engine_tiny_qa"]
    assert len(samples) == 6 and out["results"]["dist_engine_tiny_qa"]["acc,none"] >= 0.5
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    pairs, scores = [], []
    for s in samples:
        for (context, continuation), resp in zip((a["arguments"] for a in s["arguments"].values())
                                                 if isinstance(s["arguments"], dict) else s["arguments"],
                                                 s["resps"]):
            whole = tok.encode(context + continuation, add_special_tokens=False)
            ctx = tok.encode(context, add_special_tokens=False)
            pairs.append((whole, len(ctx)))
            scores.append(resp[0][0])
    with LLM(MODEL, max_model_len=1024, kv_cache_memory="64MiB") as llm:
        outs = llm.generate(prompt_token_ids=[w for w, _ in pairs], sampling_params=SamplingParams(
            temperature=0, max_tokens=1, prompt_logprobs=0))
    for (whole, n), o, score in zip(pairs, outs, scores):
        own = sum(o.prompt_logprobs[i][whole[i]] for i in range(n, len(whole)))
        assert abs(own - score) < 1e-3, (own, score)
