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
