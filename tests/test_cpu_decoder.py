"""The C driver that runs a decode step's layers in one call (kernels/decoder.c) gives the
Python path's bits: same tokens and logprobs, dense and quantized weights, fp32 and bf16,
batched decode and steps of several queries a sequence (short prompts, like MTP
verification; the speculative tests run verification through it as well)."""

from __future__ import annotations

import pytest
import torch

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


def test_mtp_block_through_the_driver_gives_the_python_paths_bits(grafted):
    """The MTP layer's block drafts in one C call (``attach_block``): each of its catch-up and
    chained steps (batched, several rows a sequence) gives the Python path's bits, K/V included."""
    path, graft, _ = grafted
    spec = {"method": "mtp", "model": graft, "num_speculative_tokens": 3, "min_draft_acceptance": 0.0}
    with LLM(path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64, block_size=4,
             speculative="mtp", speculative_config=spec) as llm:
        drafter = llm.engine.executor.worker.runner.drafter
        block, real = drafter.mtp.layer, drafter.forward_layer
        driver, steps = block.cpu_decoder, []
        assert driver is not None

        def both(positions, ids, hidden, meta):  # the step by Python, then again by C
            kv = drafter.kv
            before = kv.k.clone(), kv.v.clone()
            block.cpu_decoder = None
            slow = real(positions, ids, hidden, meta).clone()
            after = kv.k.clone(), kv.v.clone()
            kv.k.copy_(before[0]), kv.v.copy_(before[1])
            block.cpu_decoder = driver
            ran = []
            forward = driver.forward
            driver.forward = lambda *a: ran.append(forward(*a)) or ran[-1]
            fast = real(positions, ids, hidden, meta)
            del driver.forward
            same_kv = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bits: unwritten slots hold anything
                          for a, b in zip((kv.k, kv.v), after))
            steps.append((ids.shape[0], ran[0] is not None, torch.equal(fast, slow), same_kv))
            return fast

        drafter.forward_layer = both
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0, max_tokens=24,
                                                                              ignore_eos=True))
    assert len(steps) > 10 and max(rows for rows, *_ in steps) > 3
    assert all(ran and same and kv for _, ran, same, kv in steps), steps
