"""TurboQuant caches combined with the rest of the engine: MTP speculation, the static decode
path CUDA graphs record, TP=2 + DCP=2, the hybrid Qwen3.5 (Gated DeltaNet layers keep their
recurrent state, the full-attention layers and the MTP layer store codes) and quantized weights
(the one-call CPU decoder reads plain K/V only, so it steps aside for codes)."""

from __future__ import annotations

import pytest
from test_turboquant import ARGS, LONG, PROMPTS, _greedy

from dist_engine import LLM, SamplingParams
from dist_engine.layers.state_cache import LayerState
from dist_engine.layers.tq_cache import TurboQuantKV


def test_speculative_decoding_is_lossless(grafted):
    """MTP speculation (K = 3) over a TurboQuant cache: drafts' K/V are quantized when verified
    and overwritten when rejected, so greedy and seeded output equal plain decoding."""
    from test_spec_decode import ARGS as SPEC_ARGS
    from test_spec_decode import PROMPTS as SPEC_PROMPTS
    from test_spec_decode import mixed_params, spec

    path, folder, _ = grafted
    params = mixed_params()
    outs = {}
    for cfg in (None, spec(folder, 3, max_draft_tokens_per_step=0)):
        with LLM(path, **SPEC_ARGS, kv_cache_dtype="turboquant3", speculative_config=cfg) as llm:
            res = llm.generate(prompt_token_ids=SPEC_PROMPTS, sampling_params=params)
            outs[cfg is None] = [o.outputs[0].token_ids for o in res]
            assert llm.engine.blocks.num_free == SPEC_ARGS["num_kv_blocks"]
            if cfg is not None:
                assert llm.engine.spec_stats.num_accepted_tokens > 0
                assert isinstance(llm.engine.executor.worker.runner.drafter.kv, TurboQuantKV)
    assert outs[False] == outs[True]


def test_static_decode_path_reads_the_codes(tiny_models, monkeypatch):
    """The decode path CUDA graphs record (gathered, dequantized keys in the rotated basis),
    run eagerly on CPU: the tokens of the C kernel's path, logprobs within rounding."""
    from dist_engine.worker import cuda_graph

    path = tiny_models("llama")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    got = {}
    for static in (False, True):
        monkeypatch.setattr(cuda_graph, "STATIC_DECODE_ON_CPU", static)
        with LLM(path, kv_cache_dtype="turboquant4", num_kv_blocks=120, **ARGS) as llm:
            got[static] = [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)]
            graphs = llm.engine.executor.worker.runner.graphs
            assert (graphs is not None and graphs.num_steps >= 10) == static
    for a, b in zip(got[False], got[True]):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert all(abs(x[t] - y[t]) < 1e-4 for t in x)


@pytest.mark.distributed
def test_tp2_dcp2_matches_one_rank(tiny_models, ray_session):
    """TP=2 + DCP=2 over Ray (one KV head: both TP ranks hold it, with the same rotation, and
    shard its blocks by DCP; partial attentions in the rotated basis merge by log-sum-exp):
    the tokens of one rank, a prefix hit, every block back. One multi-rank layout keeps CI
    short (~80 s each under load); what TP alone and CP rely on (a rank's heads stored as the
    one-rank cache stores them, shards merged in the rotated basis) is checked in-process by
    test_turboquant.py::test_shards_store_like_one_rank_and_merge_in_the_rotated_basis, and CP
    itself with plain caches by test_context_parallel.py."""
    path = tiny_models("llama1kv")
    kw = dict(kv_cache_dtype="turboquant4", num_kv_blocks=160, max_num_batched_tokens=64, **ARGS)
    with LLM(path, **kw) as llm:
        expected = _greedy(llm)
    with LLM(path, tensor_parallel_size=2, decode_context_parallel_size=2, **kw) as llm:
        assert _greedy(llm) == expected
        again = llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True))[0]
        assert again.metrics.prefix_hit_tokens >= 80 and again.outputs[0].token_ids == expected[1]
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def _first_logprobs(llm: LLM, prompt: list[int]) -> dict[int, float]:
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    return llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].outputs[0].logprobs[0]


def _distance(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[t] - b[t]) for t in set(a) & set(b))


def test_hybrid_qwen3_5_attention_layers_store_codes(qwen3_5_models):
    """Qwen3.5 (3 Gated DeltaNet layers, 1 full-attention layer): the attention layer and the
    MTP layer hold codes, the recurrent layers their fp32 state; the start-up figures are the
    allocated bytes. Greedy tokens: batched = alone = again from prefix-cache hits (resuming
    from state checkpoints); MTP speculation (its random drafts mostly rejected, so the state
    rolls back) = plain; the first token's top-5 logprobs within 0.05 of the exact cache's."""
    from test_qwen3_5_engine import ENGINE, engine_prompts, generate

    path = qwen3_5_models("qwen3_5")
    prompts = engine_prompts()
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(path, speculative="none", **ENGINE) as llm:
        exact = _first_logprobs(llm, prompts[0])
    with LLM(path, speculative="none", kv_cache_dtype="turboquant4", **ENGINE) as llm:
        runner, info = llm.engine.executor.worker.runner, llm.engine.cache_info
        kinds = [type(c) for c in runner.kv_caches]
        assert kinds == [LayerState, LayerState, LayerState, TurboQuantKV]
        tq = runner.kv_caches[3]
        assert tq.k_mean is not None and info["allocated_bytes"]["full"] == tq.nbytes()
        assert info["bytes_per_block"] == tq.nbytes() // info["num_blocks"]
        assert _distance(_first_logprobs(llm, prompts[0]), exact) < 0.05
        solo = [generate(llm, [p], greedy)[0] for p in prompts]
        assert generate(llm, prompts, greedy) == solo
        again = llm.generate(prompt_token_ids=prompts, sampling_params=greedy)
        assert [o.outputs[0].token_ids for o in again] == solo
        assert [o.metrics.prefix_hit_tokens >= 64 for o in again] == [len(p) > 64 for p in prompts]
    with LLM(path, speculative="mtp", num_speculative_tokens=2, kv_cache_dtype="turboquant4", **ENGINE) as llm:
        assert isinstance(llm.engine.executor.worker.runner.drafter.kv, TurboQuantKV)
        assert generate(llm, prompts, greedy) == solo
        assert llm.engine.spec_stats.num_draft_tokens > 0
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_quantized_weights(tiny_models, monkeypatch):
    """int4 weights quantized at load with TurboQuant K/V: the one-call CPU decoder runs the
    exact cache's decode steps but steps aside for codes; greedy tokens batched = alone, and
    the first token's top-5 logprobs within 0.1 of the exact cache's (the float weights' bound)."""
    from dist_engine.kernels.decoder import CPUDecoder

    calls = {"ran": 0}
    forward = CPUDecoder.forward

    def counted(self, *a):
        out = forward(self, *a)
        calls["ran"] += out is not None
        return out

    monkeypatch.setattr(CPUDecoder, "forward", counted)
    path = tiny_models("llama")
    kw = dict(quantization="int4", num_kv_blocks=300, speculative="none", **ARGS)
    with LLM(path, **kw) as llm:
        exact = _first_logprobs(llm, LONG)
        _greedy(llm, PROMPTS[:1], 4)
    assert calls["ran"] > 0  # the exact cache's decode steps ran through the C decoder
    calls["ran"] = 0
    with LLM(path, kv_cache_dtype="turboquant4", **kw) as llm:
        assert isinstance(llm.engine.executor.worker.runner.kv_caches[0], TurboQuantKV)
        assert _distance(_first_logprobs(llm, LONG), exact) < 0.1
        alone = [_greedy(llm, [p])[0] for p in PROMPTS]
        assert _greedy(llm) == alone
    assert calls["ran"] == 0
