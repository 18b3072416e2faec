"""Engine behaviour: batching equals running alone, chunked prefill, preemption, admission."""

from __future__ import annotations

import pytest

from conftest import hf_greedy
from dist_engine import LLM, SamplingParams

PROMPTS = [
    [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4],
    [1, 5, 6],
    [1, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89],
    [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 8, 8],  # shares a prefix
    [1, 300],
]
LENS = [24, 9, 17, 30, 5]
ARGS = dict(skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64, block_size=4)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_models):
    path = tiny_models("llama")
    return path, [hf_greedy(path, p, n) for p, n in zip(PROMPTS, LENS)]


@pytest.mark.parametrize("kw", [
    dict(),  # everything in one batch
    dict(max_num_batched_tokens=7),  # chunked prefill mixed with decode
    dict(max_num_seqs=2),  # requests join as others leave
    dict(enable_prefix_caching=False),
], ids=["batched", "chunked", "max2seqs", "noprefix"])
def test_batched_greedy_equals_alone(reference, kw):
    path, expected = reference
    with LLM(path, **{**ARGS, **kw}) as llm:
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=[greedy(n) for n in LENS])
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert llm.engine.blocks.num_free == 64  # nothing leaked


def test_preemption_recomputes_and_matches(reference):
    path, expected = reference
    # 14 blocks of 4 tokens cannot hold all five sequences at full length: someone is preempted
    with LLM(path, skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=14, block_size=4) as llm:
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=[greedy(n) for n in LENS])
        assert llm.engine.scheduler.num_preemptions > 0
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert llm.engine.blocks.num_free == 14


def test_prefix_cache_hits_are_counted(reference):
    path, expected = reference
    with LLM(path, **ARGS) as llm:
        llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(LENS[0]))
        out = llm.generate(prompt_token_ids=[PROMPTS[3]], sampling_params=greedy(LENS[3]))
        assert out[0].metrics.prefix_hit_tokens == 16  # 4 shared full blocks
        assert out[0].outputs[0].token_ids == expected[3]


def test_cache_salt_isolates_prefix_hits(reference):
    """Requests share cached blocks only within one cache_salt (and unsalted with unsalted)."""
    path, expected = reference
    with LLM(path, **ARGS) as llm:
        def hit(salt):
            out = llm.generate(prompt_token_ids=[PROMPTS[3]], sampling_params=greedy(LENS[3]),
                               cache_salt=salt)[0]
            assert out.outputs[0].token_ids == expected[3]
            return out.metrics.prefix_hit_tokens

        llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(LENS[0]), cache_salt="a")
        assert hit("b") == 0 and hit(None) == 0  # another tenant, and no salt at all
        assert hit("a") == 16
        assert hit("b") == 16  # "b" has now cached its own copy
        with pytest.raises(ValueError, match="cache_salt"):
            llm.generate(prompt_token_ids=[PROMPTS[0]], cache_salt="")
        assert llm.engine.blocks.num_free == 64


def test_hidden_states_match_transformers(tiny_models):
    """``return_hidden_states``: the final-norm hidden state of every fed position, as
    transformers computes it, through chunked prefill and preemption; such a request skips
    prefix-cache hits (and n > 1 prompt sharing) so every position runs."""
    import torch

    from conftest import hf_model

    path = tiny_models("llama")
    model = hf_model(path)

    def check(outs):
        for o in outs:
            for c in o.outputs:
                seq = o.prompt_token_ids + c.token_ids
                with torch.inference_mode():
                    ref = model.model(torch.tensor([seq[:-1]])).last_hidden_state[0]
                assert c.hidden_states.shape == ref.shape
                torch.testing.assert_close(c.hidden_states, ref, atol=1e-4, rtol=1e-4)

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, return_hidden_states=True)
              for n in LENS]
    with LLM(path, skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=14, block_size=4,
             max_num_batched_tokens=7) as llm:
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)
        assert llm.engine.scheduler.num_preemptions > 0
        check(outs)
        assert llm.engine.blocks.num_free == 14
    with LLM(path, **ARGS) as llm:
        llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(LENS[0]))  # cached
        n2 = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6, return_hidden_states=True)
        outs = llm.generate(prompt_token_ids=[PROMPTS[3], PROMPTS[3]], sampling_params=[params[3], n2])
        assert outs[0].metrics.prefix_hit_tokens == 0 and len(outs[1].outputs) == 2
        check(outs)
        plain = llm.generate(prompt_token_ids=[PROMPTS[3]], sampling_params=greedy(LENS[3]))[0]
        assert plain.outputs[0].hidden_states is None and plain.metrics.prefix_hit_tokens == 16


def test_requests_that_cannot_fit_are_rejected_up_front(tiny_models):
    with LLM(tiny_models("llama"), skip_tokenizer_init=True, max_model_len=32, num_kv_blocks=4,
              block_size=4) as llm:
        with pytest.raises(ValueError, match="max_model_len=32"):
            llm.generate(prompt_token_ids=[[1] * 30], sampling_params=greedy(5))
        with pytest.raises(ValueError, match="whole KV cache"):
            llm.generate(prompt_token_ids=[[1] * 10], sampling_params=greedy(10))
        with pytest.raises(ValueError, match="out of the vocabulary"):
            llm.generate(prompt_token_ids=[[1, 5000]], sampling_params=greedy(2))
        with pytest.raises(ValueError, match="must be integers, got str"):  # text where ids belong
            llm.generate(prompt_token_ids=["hello"], sampling_params=greedy(2))
        with pytest.raises(ValueError, match="must be integers, got float, list"):
            llm.generate(prompt_token_ids=[[1, 2.0, [3]]], sampling_params=greedy(2))
        import numpy as np  # NumPy integers are token ids too

        assert llm.generate(prompt_token_ids=[np.array([1, 5, 7])], sampling_params=greedy(2))[0].outputs
        with pytest.raises(ValueError, match="empty"):
            llm.generate(prompt_token_ids=[[]], sampling_params=greedy(2))
        assert not llm.engine.has_unfinished() and llm.engine.blocks.num_free == 4


def test_seeded_sampling_is_batch_independent(tiny_models):
    path = tiny_models("llama")
    with LLM(path, **ARGS) as llm:
        sp = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
        alone = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=sp)[0].outputs[0].token_ids
        mixed = llm.generate(prompt_token_ids=PROMPTS, sampling_params=[sp] + [
            SamplingParams(temperature=1.0, seed=i, max_tokens=7 + i, ignore_eos=True) for i in range(4)])
        assert mixed[0].outputs[0].token_ids == alone
        other = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=SamplingParams(
            temperature=0.8, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True))
        assert other[0].outputs[0].token_ids != alone  # the seed matters


def test_min_tokens_and_stop_token_ids(tiny_models):
    path = tiny_models("llama")
    with LLM(path, **ARGS) as llm:
        free = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(12))[0].outputs[0]
        stop_tok = free.token_ids[5]
        first = free.token_ids.index(stop_tok)
        out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=SamplingParams(
            temperature=0, max_tokens=12, stop_token_ids=[stop_tok]))[0].outputs[0]
        assert out.token_ids == free.token_ids[:first + 1]
        assert out.finish_reason == "stop" and out.stop_reason == stop_tok
        out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=SamplingParams(
            temperature=0, max_tokens=12, min_tokens=12, stop_token_ids=[stop_tok]))[0].outputs[0]
        assert len(out.token_ids) == 12 and stop_tok not in out.token_ids
        assert out.finish_reason == "length"


def test_prompt_logprobs_and_logit_bias(tiny_models):
    """``prompt_logprobs``: every prompt token's logprob as transformers computes it, through
    chunked prefill (the token after a chunk comes from the next one) and with top-n entries;
    ``logit_bias`` moves the draw."""
    import torch

    from conftest import hf_model

    path = tiny_models("llama")
    prompt = PROMPTS[3] * 3
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([prompt])).logits[0].float(), -1)
    with LLM(path, skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=32, block_size=4,
             max_num_batched_tokens=7) as llm:
        llm.generate(prompt_token_ids=[prompt], sampling_params=greedy(2))  # cached, yet recomputed
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            temperature=0, max_tokens=1, prompt_logprobs=2, logit_bias={7: 100.0}))[0]
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for i, entry in enumerate(out.prompt_logprobs[1:]):
            assert abs(entry[prompt[i + 1]] - ref[i, prompt[i + 1]].item()) < 1e-4
            top = ref[i].topk(2)
            assert all(abs(entry[t] - v) < 1e-4 for t, v in zip(top.indices.tolist(), top.values.tolist()))
        assert out.outputs[0].token_ids == [7] and out.metrics.prefix_hit_tokens == 0
        assert llm.engine.blocks.num_free == 32
