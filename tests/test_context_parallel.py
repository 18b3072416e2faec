"""Context parallelism: every sequence's KV cache split over CP ranks (blocks striped), partial
attentions merged by log-sum-exp. Same tokens as one rank; the longest context doubles."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from conftest import hf_model
from dist_engine import LLM, SamplingParams
from dist_engine.layers.attention import merge_partials

rng = random.Random(11)
LONG = [1] + [rng.randrange(3, 320) for _ in range(300)]  # 76 blocks of 4
PROMPTS = [LONG, LONG[:120] + [5, 6, 7], [1] + [rng.randrange(3, 320) for _ in range(40)], [1, 9]]
ARGS = dict(skip_tokenizer_init=True, max_model_len=512, block_size=4, max_num_batched_tokens=64)


def params() -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0.8, seed=5, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]


def test_lse_merge_equals_full_softmax_with_empty_shards():
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 8), torch.randn(40, 8), torch.randn(40, 8)
    scores = q @ k.t()  # [5, 40]
    full = torch.softmax(scores, -1) @ v
    owner = torch.arange(40) % 3  # three shards, keys striped
    outs, lses = [], []
    for s in range(4):  # shard 3 holds nothing
        mask = owner == s
        if mask.any():
            sc = scores[:, mask]
            lse = torch.logsumexp(sc, -1)
            outs.append(torch.softmax(sc, -1) @ v[mask])
        else:
            lse = torch.full((5,), float("-inf"))
            outs.append(torch.zeros(5, 8))
        lses.append(lse)
    out, lse = merge_partials(outs, lses)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    empty, lse_e = merge_partials([torch.zeros(2, 8)] * 2, [torch.full((2,), float("-inf"))] * 2)
    assert not empty.isnan().any() and (empty == 0).all() and torch.isinf(lse_e).all()


def _outputs(llm: LLM) -> list:
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params())
    return [o.outputs[0] for o in outs]


def split_steps(llm: LLM) -> list[int]:
    import ray

    return ray.get([w.__ray_call__.remote(lambda self: self.runner.num_split_steps)
                    for w in llm.engine.executor.workers])


def _matches_reference(llm: LLM, ref: list, blocks: int) -> None:
    """The reference tokens, logprobs within 1e-4, a prefix hit on LONG's cached blocks (on every
    shard), and all ``blocks`` free afterwards."""
    got = _outputs(llm)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    for a, b in zip(got[0].logprobs, ref[0].logprobs):
        for tok, lp in b.items():
            assert abs(a[tok] - lp) < 1e-4
    again = llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=params()[1])[0]
    assert again.outputs[0].token_ids == ref[1].token_ids
    assert again.metrics.prefix_hit_tokens >= 100
    # hidden states asked for: every position runs again (split over the ranks), rank 0's rows
    full = llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=dataclasses.replace(
        params()[1], return_hidden_states=True))[0]
    assert full.metrics.prefix_hit_tokens == 0 and full.outputs[0].token_ids == ref[1].token_ids
    seq = PROMPTS[1] + ref[1].token_ids
    with torch.inference_mode():
        h = hf_model(llm.engine.config.model.path).model(torch.tensor([seq[:-1]])).last_hidden_state[0]
    torch.testing.assert_close(full.outputs[0].hidden_states, h, atol=1e-4, rtol=1e-4)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks == blocks


@pytest.fixture(scope="module")
def reference(tiny_models):
    path = tiny_models("llama")
    with LLM(path, num_kv_blocks=400, **ARGS) as llm:
        return path, _outputs(llm)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 2)], ids=["cp2", "tp2xcp2"])
def test_cp_matches_single_rank(reference, ray_session, tp, cp):
    """Long prompts over many blocks, chunked prefill (64 tokens a step), a prefix hit, mixed
    greedy and seeded sampling: the same tokens, logprobs within 1e-4, no block left behind."""
    path, ref = reference
    with LLM(path, tensor_parallel_size=tp, context_parallel_size=cp, num_kv_blocks=200,
             **ARGS) as llm:
        _matches_reference(llm, ref, blocks=200 * cp)
        # the prefill chunks were split over the CP ranks (each computed only its own tokens)
        assert min(split_steps(llm)) > 0


def _doubles_preempts_and_aborts(path: str, ref: list, single: dict, sharded: dict) -> None:
    """``single`` refuses the 301-token prompt; two sequence shards of 45 blocks serve all four
    prompts (preempting) with the reference tokens, and an abort mid-generation returns its
    blocks to their own shards."""
    with LLM(path, **single, **ARGS) as llm:
        with pytest.raises(ValueError, match="exceeds the whole KV cache"):
            llm.generate(prompt_token_ids=[LONG], sampling_params=params()[0])
    with LLM(path, **sharded, **ARGS) as llm:
        got = _outputs(llm)
        assert [c.token_ids for c in got] == [c.token_ids for c in ref]
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.blocks.num_free == 90
        eng = llm.engine
        eng.add_request("x", LONG, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        while not any(o.outputs[0].token_ids for o in eng.step()):
            pass
        assert eng.blocks.num_free < 90
        eng.abort_request("x")
        assert eng.blocks.num_free == 90
        assert all(len(f) == 45 for f in eng.blocks.free)  # every shard's free list is whole


@pytest.mark.distributed
def test_cp2_doubles_the_longest_context_and_preempts_cleanly(reference, ray_session):
    """40 blocks of 4 per rank: one rank cannot hold the 301-token prompt + 24, two can; with
    all four prompts at once the two ranks also preempt and still match."""
    path, ref = reference
    _doubles_preempts_and_aborts(path, ref, dict(num_kv_blocks=40),
                                 dict(context_parallel_size=2, num_kv_blocks=45))


@pytest.mark.distributed
def test_cp2_with_mtp_speculation(grafted, ray_session):
    path, folder, _ = grafted
    p = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
         SamplingParams(temperature=0.8, seed=2, max_tokens=30, ignore_eos=True)]
    with LLM(path, num_kv_blocks=400, **ARGS) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=p)]
    spec = {"model": folder, "num_speculative_tokens": 3, "max_draft_tokens_per_step": 0}
    with LLM(path, context_parallel_size=2, num_kv_blocks=200, speculative_config=spec, **ARGS) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=p)]
        assert got == expected
        assert llm.engine.spec_stats.num_accepted_tokens > 0
        assert llm.engine.blocks.num_free == 400


@pytest.fixture(scope="module")
def one_kv_head(tiny_models):
    """A 1-KV-head model (the MLA-like case): at TP=2 its KV head would be stored twice."""
    path = tiny_models("llama1kv")
    with LLM(path, num_kv_blocks=400, **ARGS) as llm:
        return path, _outputs(llm)


@pytest.mark.distributed
@pytest.mark.parametrize("cp", [1, 2], ids=["tp2dcp2", "tp2dcp2xcp2"])
def test_dcp_inside_tp_matches_single_rank(one_kv_head, ray_session, cp):
    """TP=2 ranks that would duplicate the one KV head hold alternate blocks instead: the same
    tokens and logprobs as one rank, twice (or, with CP=2, four times) the blocks, none leaked."""
    path, ref = one_kv_head
    with LLM(path, tensor_parallel_size=2, decode_context_parallel_size=2, context_parallel_size=cp,
             num_kv_blocks=100, **ARGS) as llm:
        _matches_reference(llm, ref, blocks=100 * 2 * cp)


@pytest.mark.distributed
def test_dcp2_doubles_the_longest_context(one_kv_head, ray_session):
    """45 blocks of 4 per rank: TP=2 alone cannot hold the 301-token prompt (both ranks store the
    same KV head), TP=2 + DCP=2 can, and preempts and recovers with all four prompts."""
    path, ref = one_kv_head
    _doubles_preempts_and_aborts(path, ref, dict(tensor_parallel_size=2, num_kv_blocks=45),
                                 dict(tensor_parallel_size=2, decode_context_parallel_size=2, num_kv_blocks=45))


@pytest.mark.distributed
def test_dcp2_with_mtp_speculation(one_kv_head, ray_session, tmp_path):
    """A 1-KV-head model with a (briefly) grafted MTP layer: speculative output at TP=2 + DCP=2
    equals plain decoding on one rank, greedy and seeded; the MTP layer's cache is sharded too."""
    from dist_engine.graft.train import graft

    path, _ = one_kv_head
    r = random.Random(1)
    prompts = [[1] + [r.randrange(3, 320) for _ in range(r.randrange(4, 12))] for _ in range(120)]
    with LLM(path, num_kv_blocks=400, **ARGS) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=30, ignore_eos=True))
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    graft(path, seqs[:100], seqs[100:], str(tmp_path), epochs=3, depth=2, lr=3e-3, batch_size=16,
          draft_vocab_size=320, dtype="float32")
    p = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
         SamplingParams(temperature=0.8, seed=2, max_tokens=30, ignore_eos=True)]
    with LLM(path, num_kv_blocks=400, **ARGS) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=p)]
    spec = {"model": str(tmp_path), "num_speculative_tokens": 2, "max_draft_tokens_per_step": 0}
    with LLM(path, tensor_parallel_size=2, decode_context_parallel_size=2, num_kv_blocks=200,
             speculative_config=spec, **ARGS) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=p)]
        assert got == expected
        assert llm.engine.spec_stats.num_draft_tokens > 0
        assert llm.engine.blocks.num_free == 400


def test_dcp_needs_replicated_kv_heads(tiny_models):
    # 3 KV heads at TP=2 are split, not replicated: nothing for DCP to share
    with pytest.raises(ValueError, match="replicated a multiple of 2"):
        LLM(tiny_models("llama"), tensor_parallel_size=2, decode_context_parallel_size=2, **ARGS)
    with pytest.raises(ValueError, match="divide tensor_parallel_size"):
        LLM(tiny_models("llama1kv"), tensor_parallel_size=1, decode_context_parallel_size=2, **ARGS)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(context_parallel_size=2),
                                    dict(tensor_parallel_size=2, decode_context_parallel_size=2)],
                         ids=["cp2", "tp2dcp2"])
def test_thousands_of_tokens_match_transformers(tiny_models, ray_session, layout):
    """A 4500-token prompt (282 blocks of 16) in 512-token chunks, split over the CP ranks or
    sharded inside the TP group, with the long-context attention layout: transformers' greedy
    tokens, and logprobs within 1e-4 of one rank."""
    from conftest import hf_greedy

    path = tiny_models("llama1kv_long")
    r = random.Random(5)
    prompt = [1] + [r.randrange(3, 320) for _ in range(4499)]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    kw = dict(skip_tokenizer_init=True, max_model_len=4600, max_num_batched_tokens=512)
    with LLM(path, num_kv_blocks=300, **kw) as llm:
        ref = llm.generate(prompt_token_ids=[prompt], sampling_params=p)[0].outputs[0]
    assert ref.token_ids == hf_greedy(path, prompt, 8)
    with LLM(path, num_kv_blocks=150, **layout, **kw) as llm:
        got = llm.generate(prompt_token_ids=[prompt], sampling_params=p)[0].outputs[0]
        assert llm.engine.blocks.num_free == 300
    assert got.token_ids == ref.token_ids
    for a, b in zip(got.logprobs, ref.logprobs):
        for tok, lp in b.items():
            assert abs(a[tok] - lp) < 1e-4
