"""TP=2 over Ray actors with gloo (and the shared-memory all-reduce): same tokens, same logits."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from conftest import ARCHS, hf_greedy, hf_model
from dist_engine import LLM, SamplingParams
from dist_engine.worker.executor import EngineDeadError

pytestmark = pytest.mark.distributed
PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4]


@pytest.mark.parametrize("arch,shm", [(a, True) for a in ARCHS] + [("llama", False)])
def test_tp2_matches_transformers(tiny_models, ray_session, arch, shm):
    """9 query / 3 KV heads split 6+3 / 2+1; one KV head replicated on both ranks."""
    path = tiny_models(arch)
    expected = hf_greedy(path, PROMPT, 32)
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([PROMPT])).logits[0, -1].float(), -1)
    llm = LLM(path, tensor_parallel_size=2, skip_tokenizer_init=True, max_model_len=256,
              num_kv_blocks=64, block_size=8, shm_allreduce=shm)
    try:
        out = llm.generate(prompt_token_ids=[PROMPT, PROMPT[:9]], sampling_params=[
            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5),
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)])
        assert out[0].outputs[0].token_ids == expected
        first = out[0].outputs[0].logprobs[0]
        for tok, lp in first.items():
            assert abs(lp - ref[tok].item()) < 1e-4
        assert out[1].outputs[0].token_ids == hf_greedy(path, PROMPT[:9], 8)
    finally:
        llm.shutdown()


def test_worker_death_gives_error_not_hang(tiny_models, ray_session):
    import ray

    path = tiny_models("llama")
    llm = LLM(path, tensor_parallel_size=2, skip_tokenizer_init=True, max_model_len=512,
              num_kv_blocks=128, block_size=8)
    victim = llm.engine.executor.workers[1]
    pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()))

    def kill_soon():
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_soon, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError):
        while True:  # keeps generating until the dead worker is noticed
            llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
                temperature=0, max_tokens=200, ignore_eos=True))
    assert time.monotonic() - t0 < 20
    with pytest.raises(EngineDeadError):
        llm.engine.executor.check_health()
    llm.shutdown()


RAY_REUSE = r"""
import sys
import ray
from dist_engine import LLM, SamplingParams

path = sys.argv[1]
kw = dict(skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=16, speculative="none")
p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
outs = []
for tp, cp in ((1, 2), (2, 2)):  # the second engine needs more ranks than the first declared
    with LLM(path, tensor_parallel_size=tp, context_parallel_size=cp, **kw) as llm:
        outs.append(llm.generate(prompt_token_ids=[[1, 5, 9]], sampling_params=p)[0].outputs[0].token_ids)
assert outs[0] == outs[1], outs
ray.shutdown()
ray.init(address="local", num_cpus=2, include_dashboard=False)  # the user's own instance
try:
    LLM(path, tensor_parallel_size=2, context_parallel_size=2, **kw)
except ValueError as e:
    assert "ray start --num-cpus 4" in str(e), e
else:
    raise AssertionError("a user's 2-CPU cluster cannot hold 4 ranks")
assert ray.is_initialized()  # never torn down
print("OK")
"""


@pytest.mark.distributed
def test_a_later_engine_may_need_more_ranks(tiny_models):
    """In one process, an engine of 2 ranks then one of 4: the local Ray instance the first
    started grows; a Ray instance the user started is only checked, never restarted."""
    import subprocess
    import sys

    path = tiny_models("llama")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    res = subprocess.run([sys.executable, "-c", RAY_REUSE, path], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]
