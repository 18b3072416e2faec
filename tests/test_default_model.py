"""The default model against transformers reading the GGUF file itself (not our converted folder)."""

from __future__ import annotations

import os

import pytest
import torch

from dist_engine import LLM, SamplingParams
from dist_engine.weights.registry import DEFAULT_MODEL, fetch_gguf

pytestmark = pytest.mark.slow
# regression floor: this test measured 1.69 with graft stage 4, 2.00 with stage 5 and 1.94 with
# stage 6 (default 16-bit draft path; on two prompts near-ties move it by several hundredths;
# over 100 held-out prompts the three stages give 1.94, 1.98 and 2.03)
MIN_MEAN_ACCEPTED_LENGTH = 1.75


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


def test_shipped_mtp_graft_speculates_losslessly():
    """Acceptance regression for the graft that ships with the default model: held-out prompts,
    greedy, K=3. Output (text, stop strings, finish reasons) equals plain decoding."""
    from dist_engine.graft.artifact import shipped_graft
    from dist_engine.graft.prompts import split_prompts

    assert shipped_graft(DEFAULT_MODEL) is not None
    prompts = split_prompts()[1][:2]
    params = [SamplingParams(temperature=0, max_tokens=64),
              SamplingParams(temperature=0, max_tokens=64, stop=["\n\n"])]
    kw = dict(max_model_len=512, num_kv_blocks=64)

    def run(spec):
        with LLM(DEFAULT_MODEL, speculative="mtp" if spec else "none", speculative_config=spec, **kw) as llm:
            msgs = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
            outs = llm.generate(prompt_token_ids=msgs, sampling_params=params)
            return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs], llm.engine.spec_stats

    plain, _ = run(None)
    spec_out, stats = run({"method": "mtp", "num_speculative_tokens": 3, "min_draft_acceptance": 0.0})
    assert spec_out == plain
    assert stats.mean_accepted_length >= MIN_MEAN_ACCEPTED_LENGTH, stats.as_dict()


def test_prefix_cache_hits_keep_greedy_output_and_logprobs():
    """A prompt served again hits the prefix cache: its prefill runs on cached K/V, whose
    attention differs from the first run's in the last bits. The quantized products (digits of
    the activations on VNNI CPUs, codes as floats elsewhere) carry such differences through at
    their size, so the tokens stay the same and their logprobs within ~1e-5. (With
    --int8-activations, activation rounding turns them into code flips: the same prompts part
    after 13 and 16 tokens, logprobs 0.06-0.09 apart before that.)"""
    prompts = ["Write a short story about a robot who learns to paint, with a twist at the end.",
               "Explain how a hash map works, with an example in Python and a note on collisions."]
    sp = SamplingParams(temperature=0, max_tokens=48, logprobs=1)
    with LLM(DEFAULT_MODEL, max_model_len=512, num_kv_blocks=64, speculative="none",
             enable_prefix_caching=True) as llm:
        ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        first = llm.generate(prompt_token_ids=ids, sampling_params=sp)
        second = llm.generate(prompt_token_ids=ids, sampling_params=sp)
        assert llm.engine.stats()["prefix_cache_hit_tokens"] >= 32  # the second run hit the cache
    for a, b in zip(first, second):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        diff = max(abs(la[t] - lb[t]) for la, lb, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs,
                                                          a.outputs[0].token_ids))
        assert diff < 1e-4
