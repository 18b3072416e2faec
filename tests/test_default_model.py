"""The default model against transformers reading the GGUF file itself (not our converted folder)."""

from __future__ import annotations

import os

import pytest
import torch

from dist_engine import LLM, SamplingParams
from dist_engine.weights.registry import DEFAULT_MODEL, fetch_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(DEFAULT_MODEL)
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def test_greedy_matches_transformers_on_gguf(gguf_reference):
    tok, model = gguf_reference
    msgs = [{"role": "user", "content": "Write a haiku about GPUs"}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False)[0, len(ids):].tolist()
    llm = LLM(DEFAULT_MODEL, max_model_len=512, num_kv_blocks=64)
    try:
        assert llm.apply_chat_template(msgs) == ids  # same tokenizer and chat template
        out = llm.generate(prompt_token_ids=[ids],
                           # min_tokens masks EOS exactly as transformers' min_new_tokens does
                           sampling_params=SamplingParams(temperature=0, max_tokens=32, min_tokens=32))
        assert out[0].outputs[0].token_ids == ref
        assert out[0].outputs[0].text == tok.decode(ref, skip_special_tokens=True)
    finally:
        llm.shutdown()
