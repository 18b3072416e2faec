"""DeepSeek-V3 (MLA + MoE) beyond one rank: the latent cache's size, experts split over TP ranks
and read only by their owner, and the latent sharded by sequence inside the TP group (DCP) or
across CP ranks, all giving transformers' greedy tokens."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_native_mtp_layer_drives_speculation_losslessly(with_mtp_layer, ray_session, tp):
    p = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
         SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)]
    prompts = [PROMPT, PROMPT[:30]]
    with LLM(with_mtp_layer, num_kv_blocks=64, speculative="none", **ARGS) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=p)]
    spec = {"method": "mtp", "num_speculative_tokens": 2, "max_draft_tokens_per_step": 0}
    with LLM(with_mtp_layer, tensor_parallel_size=tp, num_kv_blocks=64, speculative_config=spec, **ARGS) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=p)]
        assert got == expected
        assert llm.engine.spec_stats.num_draft_tokens > 0
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def _fp8_pair(src: str, out_fp8: str, out_f32: str, block: tuple[int, int]) -> None:
    """The tiny model with every decoder projection quantized to FP8 in ``block`` tiles
    (``weight`` + ``weight_scale_inv``, DeepSeek's format), and the same dequantized weights
    as a float32 checkpoint."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    quantized, plain = {}, {}
    for name, w in load_file(f"{src}/model.safetensors").items():
        if ".layers." in name and name.endswith(("proj.weight", "proj_with_mqa.weight")):
            br, bc = block
            rows, cols = -(-w.shape[0] // br), -(-w.shape[1] // bc)
            pad = torch.zeros(rows * br, cols * bc)
            pad[:w.shape[0], :w.shape[1]] = w
            tiles = pad.view(rows, br, cols, bc)
            scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-8) / 448.0  # [rows, cols]
            q = (tiles / scale[:, None, :, None]).view(rows * br, cols * bc)[:w.shape[0], :w.shape[1]]
            q = q.to(torch.float8_e4m3fn)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:w.shape[0], :w.shape[1]]
            plain[name] = q.float() * full
        else:
            quantized[name] = plain[name] = w
    for out, tensors, quant in ((out_fp8, quantized, True), (out_f32, plain, False)):
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(src):
            if not f.endswith(".safetensors"):
                shutil.copy(f"{src}/{f}", out)
        save_file(tensors, f"{out}/model.safetensors")
        if quant:
            with open(f"{out}/config.json") as f:
                c = json.load(f)
            c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": list(block)}
            with open(f"{out}/config.json", "w") as f:
                json.dump(c, f)


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_fp8_block_scaled_checkpoint_matches_its_float32_weights(tiny_models, ray_session, tmp_path, tp):
    """32 x 32 tiles: at TP=2 head and column slices start mid-tile (q_b_proj splits at row 80,
    o_proj at column 48). Weights stay FP8 in memory; logits equal the float32 checkpoint's."""
    fp8, f32 = str(tmp_path / "fp8"), str(tmp_path / "f32")
    _fp8_pair(tiny_models("deepseek_v3"), fp8, f32, (32, 32))
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=4)
    with LLM(f32, num_kv_blocks=64, **ARGS) as llm:
        ref = llm.generate(prompt_token_ids=[PROMPT], sampling_params=p)[0].outputs[0]
    with LLM(fp8, tensor_parallel_size=tp, num_kv_blocks=64, **ARGS) as llm:
        got = llm.generate(prompt_token_ids=[PROMPT], sampling_params=p)[0].outputs[0]
        if tp == 1:
            attn = llm.engine.executor.worker.runner.model.model.layers[1].self_attn
            assert attn.q_b_proj.weight.dtype == torch.float8_e4m3fn
            assert llm.engine.cache_info["weight_bytes"] < 0.6 * os.path.getsize(f"{f32}/model.safetensors")
    assert got.token_ids == ref.token_ids
    for a, b in zip(got.logprobs, ref.logprobs):
        for tok, lp in b.items():
            assert abs(a[tok] - lp) < 1e-4


def test_routing_config_errors_are_actionable(tiny_models):
    import json

    from dist_engine.config import ModelConfig

    with open(f"{tiny_models('deepseek_v3')}/config.json") as f:
        raw = json.load(f)
    with pytest.raises(ValueError, match="two best experts"):
        ModelConfig.from_dict({**raw, "n_group": 8}, "x")  # one expert per group
    with pytest.raises(ValueError, match="cannot supply"):
        ModelConfig.from_dict({**raw, "num_experts_per_tok": 5}, "x")  # 1 group of 4 experts
