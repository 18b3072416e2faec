"""FP8 KV cache: K/V stored as float8_e4m3fn with per-layer scales calibrated at start-up; one
byte per element (no full-precision shadow), logits within the documented error of the exact
cache, and the same block accounting."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dist_engine import LLM, SamplingParams
from dist_engine.layers.kv_cache import FP8_MAX, LayerKV

rng = random.Random(3)
PROMPT = [1] + [rng.randrange(3, 320) for _ in range(150)]
ARGS = dict(skip_tokenizer_init=True, max_model_len=256, block_size=4, num_kv_blocks=80)


def test_layer_kv_round_trip_error_bound():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 16) * 3
    x[:8] *= 1e-4  # some values in the subnormal range of the scaled format
    kv = LayerKV.empty(64, 2, 16, torch.float8_e4m3fn, torch.device("cpu"), zero_slots=4,
                       scales=(x.abs().max().item() * 2 / FP8_MAX,) * 2)
    slots = torch.randperm(64)
    kv.write(slots, x, -x)
    k, v = kv.gather(slots, torch.float32)
    rel = (k - x).abs() / x.abs()
    normal = x.abs() >= 2**-6 * kv.k_scale
    assert rel[normal].max() <= 2**-4 + 1e-6  # 3 mantissa bits
    assert (k - x)[~normal].abs().max() <= 2**-10 * kv.k_scale
    torch.testing.assert_close(v, -k)
    big = torch.full((1, 2, 16), 1e6)  # beyond the range: saturates, never inf/NaN
    kv.write(torch.tensor([0]), big, big)
    assert torch.isfinite(kv.gather(torch.tensor([0]), torch.float32)[0]).all()


def first_step_logprobs(llm: LLM) -> dict[int, float]:
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, logprobs=5))[0]
    return out.outputs[0]


def test_fp8_cache_is_one_byte_per_element_and_close_to_exact(tiny_models):
    path = tiny_models("llama")
    with LLM(path, **ARGS) as llm:
        exact = first_step_logprobs(llm)
        exact_bytes = llm.engine.cache_info["bytes_per_block"]
    with LLM(path, kv_cache_dtype="fp8_e4m3", **ARGS) as llm:
        runner = llm.engine.executor.worker.runner
        assert all(c.k.dtype == torch.float8_e4m3fn and c.v.dtype == torch.float8_e4m3fn
                   for c in runner.kv_caches)
        assert llm.engine.cache_info["bytes_per_block"] * 4 == exact_bytes  # fp32 model
        assert all(0 < k < 1 and 0 < v < 1 for k, v in runner.kv_scales)
        got = first_step_logprobs(llm)
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    # the first token's distribution (prompt K/V all read back from FP8) stays close
    first_exact, first_got = exact.logprobs[0], got.logprobs[0]
    shared = set(first_exact) & set(first_got)
    assert len(shared) >= 4
    assert max(abs(first_exact[t] - first_got[t]) for t in shared) < 0.1  # measured 0.049
    assert got.token_ids[0] == exact.token_ids[0]
    assert all(math.isfinite(lp) for step in got.logprobs for lp in step.values())


def test_bad_kv_cache_dtype_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(tiny_models("llama"), kv_cache_dtype="int4", **ARGS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_decode_kernel_reads_fp8(dtype):
    """The paged decode kernel over an FP8 cache (keys widened through its e4m3 table, values
    once per chunk) equals attention over the dequantized rows in float64, as the PyTorch path
    does: decode, verification and a context over several key chunks."""
    from test_cpu_kernels import reference
    from test_turboquant import _padded_groups, _sequences

    from dist_engine.kernels import paged_attention as pk
    from dist_engine.layers.attention import AttentionMetadata, paged_attention

    gen = torch.Generator().manual_seed(1)
    block_size, num_slots, Hq, Hk, D = 16, 4096, 6, 2, 32
    k, v = torch.randn(num_slots, Hk, D, generator=gen) * 3, torch.randn(num_slots, Hk, D, generator=gen)
    kv = LayerKV.empty(num_slots, Hk, D, torch.float8_e4m3fn, torch.device("cpu"), zero_slots=16,
                       scales=(k.abs().max().item() * 2 / FP8_MAX, v.abs().max().item() * 2 / FP8_MAX))
    kv.write(torch.arange(num_slots), k, v)
    seqs, starts, T = _sequences(block_size, torch.randperm(num_slots // block_size, generator=gen).tolist())
    q = torch.randn(T, Hq, D, generator=gen).to(dtype)
    meta = AttentionMetadata(num_tokens=T, slot_mapping=torch.zeros(0, dtype=torch.long),
                             groups=[pk.make_group(seqs, starts, block_size, None, T)])
    through_kernel = paged_attention(q, kv, meta, D ** -0.5)
    through_torch = paged_attention(q, kv, _padded_groups(seqs, starts, block_size), D ** -0.5)
    deq_k, deq_v = kv.gather(torch.arange(num_slots), torch.float64)
    want = reference(q.double(), deq_k, deq_v, seqs, starts, block_size, None, D ** -0.5).double()
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(through_kernel.double(), want, atol=tol, rtol=0)
    torch.testing.assert_close(through_torch.double(), want, atol=tol, rtol=0)


def test_fp8_decode_steps_take_the_c_kernel(tiny_models, monkeypatch):
    """Decode with an FP8 cache runs the C kernel; its tokens and logprobs equal the PyTorch
    path's (the A/B switch off)."""
    from dist_engine.kernels import paged_attention as pk

    calls = {"n": 0}
    attend_fp8 = pk.attend_fp8

    def counted(*a):
        calls["n"] += 1
        attend_fp8(*a)

    monkeypatch.setattr(pk, "attend_fp8", counted)
    outs, ran = {}, {}
    for kernel in (True, False):
        calls["n"] = 0
        with LLM(tiny_models("llama"), kv_cache_dtype="fp8_e4m3", **ARGS) as llm:
            runner = llm.engine.executor.worker.runner
            assert runner.use_paged_kernel
            runner.use_paged_kernel = kernel
            outs[kernel] = first_step_logprobs(llm)
        ran[kernel] = calls["n"]
    assert ran[True] >= 11 and ran[False] == 0  # 11 decode steps (x layers) through the kernel
    assert outs[True].token_ids == outs[False].token_ids
    for a, b in zip(outs[True].logprobs, outs[False].logprobs):
        assert max(abs(a[t] - b[t]) for t in a) < 1e-4
