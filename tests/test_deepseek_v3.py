"""DeepSeek-V3 (MLA + MoE) beyond one rank: the latent cache's size, experts split over TP ranks
and read only by their owner, and the latent sharded by sequence inside the TP group (DCP) or
across CP ranks, all giving transformers' greedy tokens."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import hf_greedy, hf_model
from dist_engine import LLM, SamplingParams

r = random.Random(2)
PROMPT = [1] + [r.randrange(3, 320) for _ in range(90)]
ARGS = dict(skip_tokenizer_init=True, max_model_len=256, block_size=4, max_num_batched_tokens=40)


def test_latent_cache_holds_one_latent_per_token(tiny_models):
    """kv_lora_rank + qk_rope_head_dim = 32 + 16 fp32 numbers per token and layer, where the
    expanded K/V would be 4 heads x (24 + 16 + 24)."""
    with LLM(tiny_models("deepseek_v3"), num_kv_blocks=64, **ARGS) as llm:
        per_token = llm.engine.cache_info["bytes_per_block"] // 4
        assert per_token == 2 * (32 + 16) * 4  # 2 layers
        runner = llm.engine.executor.worker.runner
        assert all(c.v is c.k for c in runner.kv_caches)  # no separate V tensor
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == hf_greedy(tiny_models("deepseek_v3"), PROMPT, 16)


def test_speculation_is_refused_clearly(tiny_models):
    with pytest.raises(ValueError, match="--speculative none"):
        LLM(tiny_models("deepseek_v3"), speculative_config={"method": "mtp", "model": "/nowhere"}, **ARGS)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2),
                                    dict(tensor_parallel_size=2, decode_context_parallel_size=2),
                                    dict(context_parallel_size=2)], ids=["tp2", "tp2dcp2", "cp2"])
def test_layouts_match_transformers(tiny_models, ray_session, layout):
    import ray

    path = tiny_models("deepseek_v3")
    expected = hf_greedy(path, PROMPT, 20)
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([PROMPT])).logits[0, -1].float(), -1)
    with LLM(path, num_kv_blocks=40, **layout, **ARGS) as llm:
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True, logprobs=4))[0].outputs[0]
        assert out.token_ids == expected
        for tok, lp in out.logprobs[0].items():
            assert abs(lp - ref[tok].item()) < 1e-4
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
        experts = ray.get([w.__ray_call__.remote(
            lambda self: sorted(int(e) for e in self.runner.model.model.layers[1].mlp.experts))
            for w in llm.engine.executor.workers])
    if layout.get("tensor_parallel_size") == 2:  # 8 experts, 4 per rank, each rank its own
        assert experts == [[0, 1, 2, 3], [4, 5, 6, 7]]
    else:
        assert experts == [list(range(8))] * 2
