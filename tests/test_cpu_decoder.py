"""The C driver that runs a decode step's layers in one call (kernels/decoder.c) gives the
Python path's bits: same tokens and logprobs, dense and quantized weights, fp32 and bf16,
batched decode and steps of several queries a sequence (short prompts, like MTP
verification; the speculative tests run verification through it as well)."""

from __future__ import annotations

import pytest

from dist_engine import LLM, SamplingParams
from dist_engine.kernels import decoder, qlinear

pytestmark = pytest.mark.skipif(not qlinear.available(), reason="no C compiler for the kernels")
PROMPTS = [[1, 17, 230, 45, 99, 3, 150], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 300]]


def _run(llm, driver: bool, params):
    model = llm.engine.executor.worker.runner.model.model
    saved = model.cpu_decoder
    model.cpu_decoder = saved if driver else None
    try:
        return [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)]
    finally:
        model.cpu_decoder = saved


@pytest.mark.parametrize("arch,dtype,quantization", [
    ("llama", "float32", None), ("qwen2", "bfloat16", None), ("mistral", "float32", "int4"),
    ("qwen2", "float32", "int8")])
def test_driver_gives_the_python_paths_bits(tiny_models, monkeypatch, arch, dtype, quantization):
    calls = []
    real = decoder.CPUDecoder.forward

    def counted(self, *a):
        out = real(self, *a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(decoder.CPUDecoder, "forward", counted)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=4)
    with LLM(tiny_models(arch), dtype=dtype, quantization=quantization, skip_tokenizer_init=True,
             max_model_len=128, num_kv_blocks=64, block_size=4, speculative="none") as llm:
        assert llm.engine.executor.worker.runner.model.model.cpu_decoder is not None
        fast = _run(llm, True, params)
        assert all(calls)  # every step (prompts of at most 16 tokens too) went through it
        slow = _run(llm, False, params)
    for a, b in zip(fast, slow):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
