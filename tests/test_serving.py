"""Serving core: penalties vs transformers, n > 1 sharing prompt blocks, the asyncio streaming API."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import hf_model
from dist_engine import LLM, AsyncLLM, SamplingParams

PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4]
OTHER = [1, 99, 98, 97, 96, 95]
ARGS = dict(skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64, block_size=4)


@pytest.fixture(scope="module")
def llm(tiny_models):
    engine = LLM(tiny_models("llama"), **ARGS)
    yield engine
    engine.shutdown()


def test_repetition_penalty_matches_transformers(llm, tiny_models):
    model = hf_model(tiny_models("llama"))
    with torch.inference_mode():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=24, min_new_tokens=24,
                             do_sample=False, repetition_penalty=1.8, pad_token_id=0)
    expected = ref[0, len(PROMPT):].tolist()
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    penalised = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, repetition_penalty=1.8)
    outs = llm.generate(prompt_token_ids=[PROMPT, OTHER], sampling_params=[penalised, plain])
    assert outs[0].outputs[0].token_ids == expected
    assert outs[0].outputs[0].token_ids != llm.generate(
        prompt_token_ids=[PROMPT], sampling_params=plain)[0].outputs[0].token_ids


def test_frequency_penalty_reduces_repeats(llm):
    def repeats(p: SamplingParams) -> int:
        ids = llm.generate(prompt_token_ids=[OTHER], sampling_params=p)[0].outputs[0].token_ids
        return len(ids) - len(set(ids))

    base = dict(temperature=0, max_tokens=40, ignore_eos=True)
    assert repeats(SamplingParams(**base, frequency_penalty=2.0, presence_penalty=2.0)) < repeats(
        SamplingParams(**base))


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_completions_share_prompt_blocks(tiny_models, prefix_caching):
    with LLM(tiny_models("llama"), **{**ARGS, "enable_prefix_caching": prefix_caching}) as eng:
        sp = SamplingParams(n=3, temperature=1.0, seed=40, max_tokens=10, ignore_eos=True)
        e = eng.engine
        e.add_request("r", PROMPT, sp)
        shared = False
        while e.has_unfinished():
            e.step()
            seqs = [s for s in e.scheduler.running if s.request_id == "r"]
            if len(seqs) == 3:  # 20 prompt tokens in blocks of 4: the first 4 blocks are shared
                tables = [s.block_table[:4] for s in seqs]
                shared |= tables[0] == tables[1] == tables[2]
                assert all(e.blocks.blocks[b].ref_count >= 3 for b in tables[0])
        assert shared
        assert e.blocks.num_free == 64
        # completion i is the n=1 completion with seed + i: siblings are real, reproducible draws
        together = eng.generate(prompt_token_ids=[PROMPT], sampling_params=sp)[0].outputs
        for i, c in enumerate(together):
            alone = SamplingParams(temperature=1.0, seed=40 + i, max_tokens=10, ignore_eos=True)
            assert c.token_ids == eng.generate(prompt_token_ids=[PROMPT],
                                               sampling_params=alone)[0].outputs[0].token_ids
        assert len({tuple(c.token_ids) for c in together}) == 3


@pytest.fixture(scope="module")
def async_llm(tiny_models):
    engine = AsyncLLM(tiny_models("llama"), **ARGS)
    yield engine
    engine.shutdown()


def test_async_streams_interleave_and_match_offline(async_llm, llm):
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(
        prompt_token_ids=[PROMPT, OTHER], sampling_params=greedy)]

    async def collect(ids):
        deltas, finals = [], None
        async for out in async_llm.generate(prompt_token_ids=ids, sampling_params=greedy):
            deltas.append(list(out.outputs[0].token_ids_delta))
            finals = out
        return deltas, finals

    async def main():
        return await asyncio.gather(collect(PROMPT), collect(OTHER))

    results = asyncio.run(main())
    for (deltas, final), exp in zip(results, expected):
        assert len(deltas) > 1  # streamed, not delivered at the end
        assert sum(deltas, []) == exp == final.outputs[0].token_ids
        m = final.metrics
        assert len(m.inter_token_latencies) == 29 and m.time_to_first_token > 0
        assert m.queue_time is not None and m.time_per_output_token > 0


def test_async_first_chunk_arrives_before_the_end_and_cancel_frees_blocks(async_llm):
    async def main():
        sp = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        agen = async_llm.generate(prompt_token_ids=PROMPT, sampling_params=sp, request_id="c")
        first = await agen.__anext__()
        assert not first.finished and first.outputs[0].token_ids
        await agen.aclose()  # a client going away aborts its request
        for _ in range(100):
            await asyncio.sleep(0.05)
            st = async_llm.stats()
            if st["num_requests"] == 0:
                break
        assert st["num_free_blocks"] == st["num_blocks"] and st["num_aborted"] >= 1

        # an explicit abort ends the stream with finish_reason "abort"
        outs = []
        async for out in async_llm.generate(prompt_token_ids=OTHER, sampling_params=sp,
                                            request_id="d"):
            outs.append(out)
            if len(outs) == 2:
                await async_llm.abort("d")
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert len(outs[-1].outputs[0].token_ids) < 100

        # bad input is refused before anything is queued; the engine keeps serving
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in async_llm.generate(prompt_token_ids=[1] * 120, sampling_params=sp):
                pass
        with pytest.raises(ValueError, match="exactly one"):
            async for _ in async_llm.generate("text", sp, prompt_token_ids=[1]):
                pass
        ok = [o async for o in async_llm.generate(prompt_token_ids=OTHER, sampling_params=SamplingParams(
            temperature=0, max_tokens=3, ignore_eos=True))]
        assert ok[-1].outputs[0].finish_reason == "length"

    asyncio.run(main())
