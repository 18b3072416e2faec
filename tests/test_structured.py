"""Structured output in the engine: outputs follow the grammar whatever the sampling, and greedy
and seeded outputs are identical with and without speculative decoding (the matcher masks
verification rows and drafts and rolls back rejected ones)."""

from __future__ import annotations

import json

import pytest

from dist_engine import LLM, SamplingParams
from dist_engine.engine.structured import StructuredOutputs

pytestmark = pytest.mark.slow
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "langs"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "langs": {"type": "array", "items": {"enum": ["en", "fr", "de"]},
                                   "maxItems": 3}}}
ASK = "Describe a fictional person as JSON with their name, age and languages."


def _valid(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"name", "age", "langs"}, text
    assert isinstance(value["name"], str) and len(value["name"]) <= 24
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert all(x in ("en", "fr", "de") for x in value["langs"]) and len(value["langs"]) <= 3


def _run(speculative: str, params: list[SamplingParams]) -> list:
    with LLM("smollm2-135m-instruct", speculative=speculative, num_speculative_tokens=3,
             max_model_len=1024, kv_cache_memory="128MiB") as llm:
        ids = llm.apply_chat_template([{"role": "user", "content": ASK}])
        outs = llm.generate(prompt_token_ids=[ids] * len(params), sampling_params=params)
        return [o.outputs[0] for o in outs], [o.metrics.spec for o in outs]


def test_json_schema_with_and_without_speculation():
    so = StructuredOutputs(json=SCHEMA)
    # 6 sequences: under the engine's 8-sequence limit for speculation, K lowered to 1 by the
    # 8-draft budget per step
    exact = [SamplingParams(temperature=0, max_tokens=64, structured_outputs=so)] + [
        SamplingParams(temperature=0.9, seed=s, max_tokens=64, structured_outputs=so) for s in range(3)]
    free = [SamplingParams(temperature=0.9, max_tokens=64, structured_outputs=so) for _ in range(2)]
    plain, _ = _run("none", exact)
    spec, stats = _run("mtp", exact + free)
    assert [c.token_ids for c in spec[:len(exact)]] == [c.token_ids for c in plain]
    for c in plain + spec:  # rejection-sampled (unseeded) requests too
        assert c.finish_reason == "stop", c.text
        _valid(c.text)
    assert sum(s.num_draft_tokens for s in stats) > 0  # drafts were proposed and verified
    assert sum(s.num_accepted_tokens for s in stats) > 0


def test_regex_choice_and_bad_constraints(tiny_chat_model):
    with LLM(tiny_chat_model, max_model_len=256, num_kv_blocks=128, block_size=4) as llm:
        ids = llm.apply_chat_template([{"role": "user", "content": "hi"}])
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=20,
                                 structured_outputs=StructuredOutputs(regex=r"[0-9]{3}-[a-c]{2}"))
                  for s in range(6)]
        params.append(SamplingParams(temperature=1.0, seed=9, max_tokens=20, structured_outputs=
                                     StructuredOutputs(choice=["yes", "no", "maybe"])))
        outs = [o.outputs[0].text for o in llm.generate(prompt_token_ids=[ids] * 7, sampling_params=params)]
        import re

        assert all(re.fullmatch(r"[0-9]{3}-[a-c]{2}", t) for t in outs[:6]), outs
        assert outs[6] in ("yes", "no", "maybe")
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
        for bad in (StructuredOutputs(json={"type": "nonsense"}), StructuredOutputs(grammar="start: (")):
            with pytest.raises(ValueError, match="not valid"):
                llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(structured_outputs=bad))
        with pytest.raises(ValueError, match="exactly one"):
            StructuredOutputs(regex="a", choice=["b"])
