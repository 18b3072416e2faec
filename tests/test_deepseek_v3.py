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


@pytest.fixture(scope="module")
def with_mtp_layer(tiny_models, tmp_path_factory):
    """The tiny DeepSeek-V3 plus a native MTP layer at model.layers.2 (an MoE block with MLA,
    enorm/hnorm/eh_proj/shared_head), as DeepSeek ships it; num_nextn_predict_layers = 1."""
    import json
    import shutil

    import transformers
    from safetensors.torch import save_file

    from conftest import TINY

    src = tiny_models("deepseek_v3")
    out = str(tmp_path_factory.mktemp("ds_mtp"))
    shutil.copytree(src, out, dirs_exist_ok=True)
    cfg = transformers.DeepseekV3Config(vocab_size=320, num_hidden_layers=3, max_position_embeddings=512,
                                        **TINY["deepseek_v3"][1])
    torch.manual_seed(7)
    block = transformers.AutoModelForCausalLM.from_config(cfg).model.layers[2]
    H = cfg.hidden_size
    state = {k: v.detach().normal_(0, 0.08) if v.dim() > 1 else v.detach() for k, v in block.state_dict().items()}
    # transformers holds experts fused ([E, 2I, H], [E, H, I]); checkpoints name each expert
    gate_up, down = state.pop("mlp.experts.gate_up_proj"), state.pop("mlp.experts.down_proj")
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        state[f"mlp.experts.{e}.gate_proj.weight"] = gate_up[e, :inter]
        state[f"mlp.experts.{e}.up_proj.weight"] = gate_up[e, inter:]
        state[f"mlp.experts.{e}.down_proj.weight"] = down[e]
    tensors = {f"model.layers.2.{k}": v for k, v in state.items()}
    extra = {"enorm.weight": torch.ones(H), "hnorm.weight": torch.ones(H),
             "eh_proj.weight": torch.randn(H, 2 * H) * 0.08, "shared_head.norm.weight": torch.ones(H),
             "shared_head.head.weight": torch.zeros(320, H), "embed_tokens.weight": torch.zeros(320, H)}
    tensors.update({f"model.layers.2.{k}": v for k, v in extra.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/mtp-layer.safetensors")
    with open(f"{out}/config.json") as f:
        c = json.load(f)
    c["num_nextn_predict_layers"] = 1
    with open(f"{out}/config.json", "w") as f:
        json.dump(c, f)
    return out


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_native_mtp_layer_drives_speculation_losslessly(with_mtp_layer, ray_session, tp):
    p = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
         SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)]
    prompts = [PROMPT, PROMPT[:30]]
    with LLM(with_mtp_layer, num_kv_blocks=64, **ARGS) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=p)]
    spec = {"method": "mtp", "num_speculative_tokens": 2, "max_draft_tokens_per_step": 0}
    with LLM(with_mtp_layer, tensor_parallel_size=tp, num_kv_blocks=64, speculative_config=spec, **ARGS) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=p)]
        assert got == expected
        assert llm.engine.spec_stats.num_draft_tokens > 0
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
