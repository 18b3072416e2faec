"""Paged experts on DeepSeek-V4 (hash-routed first layers prefetched exactly from the token ids,
DeepSeek's released names, MXFP4 experts, the MTP layer's experts) and Gemma 4 (fused 3-D
experts, router scales, per-expert scales, beside the dense MLP), and quantized experts paged in
their packed form (GPTQ int4 with activation order, AWQ int4, ``--quantization int4``): a few
experts per layer resident give transformers' tokens and the all-resident run's logprobs bit
for bit."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from gemma4_tiny import make as make_gemma
from quant_writers import _awq_pack, _pack_rows
from v4_checkpoints import random_mtp, random_v4, save_v4

from conftest import hf_greedy, make_tiny
from dist_engine import LLM, SamplingParams
from dist_engine.kernels import qlinear

r = random.Random(7)
PROMPTS = [[1] + [r.randrange(3, 320) for _ in range(40)], [1] + [r.randrange(3, 320) for _ in range(6)]]
ARGS = dict(skip_tokenizer_init=True, max_model_len=256, max_num_batched_tokens=40, num_kv_blocks=64,
            speculative="none")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)


def generate(path: str, prompts=PROMPTS, params=GREEDY, **kw):
    """(outputs, expert-cache stats or None, the cache's layers) of one engine run."""
    with LLM(path, **{**ARGS, **kw}) as llm:
        outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
        cache = llm.engine.executor.worker.runner.expert_cache
        return outs, llm.engine.stats()["expert_cache"], cache


def same(a, b) -> None:
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]


def v4_reference(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, each recomputed from the whole sequence."""
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_deepseek_v4_pages_hash_routed_and_mxfp4_experts(tmp_path):
    """Four layers of 8 experts (2 hash-routed), 4 slots: transformers' tokens and the resident
    logprobs; hash-routed layers' experts are always loaded exactly before they run (no miss
    while decoding one token a step). The released checkpoints' form (DeepSeek's names, FP8
    weights, MXFP4 experts) with the experts paged packed (a slot a sixth of fp32's), and the MTP
    layer's experts paged too while it drafts."""
    model = random_v4(0)
    one, mtp = random_mtp(5)
    path = save_v4(model, str(tmp_path / "f32"))
    resident, _, _ = generate(path)
    assert resident[0].token_ids == v4_reference(model, PROMPTS[0], 12)
    paged, s, cache = generate(path, expert_cache_memory=4 * 24576 + 2 * 24576 + 12288)
    same(paged, resident)
    assert s["num_slots"] == 4 and s["num_experts"] == 32 and s["evictions"] > 0 and s["prefetch_hits"] > 0
    # one token a step: layers 0 and 1 route by tid2eid[token], loaded exactly before they run
    # (layer 0's as the forward starts, layer 1's by layer 0); layer 2's router is guessed early
    with LLM(path, expert_cache_memory=6 * 24576 + 2 * 24576 + 12288, **ARGS) as llm:
        llm.generate(prompt_token_ids=[[1]], sampling_params=GREEDY)
        layers = llm.engine.executor.worker.runner.expert_cache.layers
        assert [layers[i].router.tid2eid is not None for i in (0, 1)] == [True, True]
        assert [(layers[i].hits, layers[i].misses) for i in (0, 1)] == [(12 * 2, 0)] * 2

    fp4 = save_v4(model, str(tmp_path / "fp4"), naming="released", fp8_block=16, fp4_experts=True, extra=mtp)
    resident, _, _ = generate(fp4)
    paged, s, cache = generate(fp4, expert_cache_memory="24KiB")
    same(paged, resident)
    slot = cache.slots[0].module
    assert type(slot.gate_up_proj.weight_packed).__name__ == "QWeight" and s["expert_bytes"] < 24576 / 6
    assert s["evictions"] > 0
    with LLM(fp4, **{**ARGS, "speculative": "mtp"}, num_speculative_tokens=2, min_draft_acceptance=0.0,
             expert_cache_memory="24KiB") as llm:
        drafted = [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        s, cache = llm.engine.stats()["expert_cache"], llm.engine.executor.worker.runner.expert_cache
        assert llm.engine.spec_stats.num_draft_tokens > 0
    assert [o.token_ids for o in drafted] == [o.token_ids for o in resident]
    assert s["num_experts"] == 40 and ("mtp.0.mlp.experts.", 3) in cache.index.refs


def test_gemma4_moe_pages_fused_experts_beside_the_dense_mlp(tmp_path):
    """Gemma 4's MoE (8 experts, top 2, router scale and per-expert scales, summed with the dense
    MLP) with 6 slots (a batch of two decoding needs up to 4, the rest prefetch the next layer's
    from its router applied early to the residual stream): transformers' tokens, the resident
    logprobs bit for bit."""
    path = make_gemma("moe", str(tmp_path / "g4"))
    resident, _, _ = generate(path)
    assert resident[0].token_ids == hf_greedy(path, PROMPTS[0], 12)
    paged, s, cache = generate(path, expert_cache_memory=8 * 24576)
    same(paged, resident)
    assert s["num_slots"] == 6 and s["num_experts"] == 32 and s["evictions"] > 0 and s["prefetches"] > 0
    assert sorted(p.prefix for p in cache.layers)[0] == "model.layers.0.experts."


def _quantized_experts(src: str, dst: str, method: str, group: int = 32) -> None:
    """``src`` (a tiny Qwen3-MoE) with every routed expert as GPTQ (with activation order: each
    expert's inputs in a random order of its own, gate and up sharing one) or AWQ int4 (random codes,
    zeros and fp16 scales), or compressed-tensors pack-quantized symmetric int4; the rest float."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(3)
    out, orders = {}, {}
    for name, w in load_file(os.path.join(src, "model.safetensors")).items():
        if ".experts." not in name:
            out[name] = w
            continue
        N, K = w.shape
        stem = name[:-len(".weight")]
        q = torch.randint(0, 16, (K, N), generator=gen)
        zero = torch.randint(1, 16, (K // group, N), generator=gen)
        scale = (torch.rand(K // group, N, generator=gen) * 0.01 + 0.005).half()
        if method == "awq":
            out.update({f"{stem}.qweight": _awq_pack(q), f"{stem}.qzeros": _awq_pack(zero), f"{stem}.scales": scale})
            continue
        if method == "compressed-tensors":  # pack-quantized, symmetric: codes stored + 8, packed along K
            out.update({f"{stem}.weight_packed": _pack_rows(q, 4).T.contiguous(), f"{stem}.weight_scale": scale.T.contiguous(),
                        f"{stem}.weight_shape": torch.tensor([N, K])})
            continue
        expert, proj = stem.rsplit(".", 1)
        key = expert + (".down" if proj == "down_proj" else ".gate_up")  # stacked parts share an order
        g_idx = orders.setdefault(key, (torch.arange(K) // group)[torch.randperm(K, generator=gen)])
        out.update({f"{stem}.qweight": _pack_rows(q, 4), f"{stem}.scales": scale, f"{stem}.g_idx": g_idx.to(torch.int32),
                    f"{stem}.qzeros": _pack_rows((zero - 1).T & 15, 4).T.contiguous()})
    os.makedirs(dst)
    save_file(out, os.path.join(dst, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True},
        "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"type": "int", "num_bits": 4, "strategy": "group",
                                                           "group_size": group, "symmetric": True}}}}}[method]
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


@pytest.mark.parametrize("form", ["gptq", "awq", "compressed-tensors", "int4"])
def test_quantized_experts_page_packed(tmp_path, form):
    """GPTQ int4 experts with activation order (each slot's input permutation refilled too), AWQ
    and compressed-tensors pack-quantized int4 experts (checkpoint formats), and float experts quantized at load (``--quantization
    int4``, with ``--int8-activations`` where the CPU has VNNI) page as packed int4 slots,
    refilled in place: the resident quantized model's tokens and logprobs bit for bit, with
    evictions."""
    path = make_tiny("qwen3_moe", str(tmp_path / "f32"), decoder_sparse_step=1)
    kw = {"quantization": "int4", "int8_activations": True} if form == "int4" else {}
    if form != "int4":
        _quantized_experts(path, str(tmp_path / form), form)
        path = str(tmp_path / form)
    resident, _, _ = generate(path, **kw)
    # --quantization: the staging copy and read buffer hold a float expert (48 KiB)
    paged, s, cache = generate(path, expert_cache_memory="64KiB" if form == "int4" else "24KiB", **kw)
    same(paged, resident)
    qw = cache.slots[1].module.down_proj.weight_packed
    # a checkpoint's scales may or may not be exact in fp16 (slots: fp32); at load they always are
    assert type(qw).__name__ == "QWeight" and qw.scales.dtype == (torch.float16 if form == "int4" else torch.float32)
    gate_up = cache.slots[1].module.gate_up_proj.weight_packed  # 64 inputs: two groups to order
    assert (gate_up.in_perm is not None) == (form == "gptq")
    assert qw.int8_activations == (form == "int4" and qlinear.has_int8_activations())  # as resident
    assert s["expert_bytes"] < 24576 / 4 and s["evictions"] > 0
