"""The expert-cache part of ``bench/gpu_check.py`` (``--parts experts``): routed experts paged
under ``--expert-cache-memory`` into a device cache.

1. Exactness on the device: the tiny Qwen3-MoE and DeepSeek-V3 of ``tests/test_expert_cache.py``
   (5 of 16 experts resident), a tiny Qwen3.5-MoE (fused 3-D expert tensors, 4 of 32), DeepSeek-V4
   (float and MXFP4 experts), Gemma 4's MoE and int4 experts (``--quantization int4``), 6 slots
   each: tokens and logprobs against the same model all resident.
2. Speed: a bf16 random MoE shape (``bench/bench_expert_cache.py``'s checkpoint, 16 layers):
   decode tok/s all resident vs device caches of 25% and 50% of the experts fed from pinned
   host memory, prefetch on and off, with hit rates, time spent waiting for copies and MiB
   copied per token.
"""

from __future__ import annotations

import os


def expert_cache(tmp: str, dev: str, quick: bool) -> dict:
    """Paged experts on the device: exactness on tiny models, then speed against all resident."""
    from bench_expert_cache import QUICK, SHAPE, make_checkpoint
    from gemma4_tiny import make as make_gemma
    from gpu_check import timed_generate
    from test_expert_cache import ARGS, DEEP, GREEDY, PROMPTS
    from v4_checkpoints import random_v4, save_v4

    from conftest import make_qwen3_5, make_tiny
    from dist_engine import LLM, SamplingParams

    def exactness(path: str, budget: int, **extra) -> dict:
        """All resident vs ``budget`` bytes of experts (fp32 on the device): tokens and logprobs."""
        outs = {}
        for b in (None, budget):
            kw = {} if b is None else {"expert_cache_memory": b}
            with LLM(path, device=dev, speculative="none", **{**ARGS, **extra}, **kw) as llm:
                outs[b] = [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
                stats = llm.engine.stats()["expert_cache"]
        a, p = outs[None], outs[budget]
        return {"identical": [o.token_ids for o in a] == [o.token_ids for o in p],
                "max_logprob_diff": max(abs(x[t] - y[t]) for oa, ob in zip(a, p)
                                        for x, y in zip(oa.logprobs, ob.logprobs) for t in x),
                "hit_rate": stats["hit_rate"], "evictions": stats["evictions"]}

    res = {arch: exactness(make_tiny(arch, os.path.join(tmp, f"paged_{arch}"), **over), 5 * 24 * 1024)
           for arch, over in DEEP.items()}  # 5 of 16 experts
    # Qwen3.5-MoE: fused 3-D expert tensors, 4 of 32 experts
    res["qwen3_5_moe"] = exactness(make_qwen3_5("qwen3_5_moe", os.path.join(tmp, "paged_qwen3_5_moe"), mtp=False),
                                   4 * 24 * 1024, max_num_batched_tokens=64)  # its recurrent layers' chunk
    # DeepSeek-V4 (hash-routed first layers; float, then MXFP4 experts in packed slots), Gemma 4's
    # MoE, and float experts quantized per load (--quantization int4: tinygemm's layout rebuilt
    # per load); quantized slots go through a staging copy (a float one for int4: its bytes added)
    v4, v4_args = random_v4(0), dict(block_size=16, max_num_batched_tokens=40)
    res["deepseek_v4"] = exactness(save_v4(v4, os.path.join(tmp, "paged_v4")), 6 * 24 * 1024, **v4_args)
    res["deepseek_v4_mxfp4"] = exactness(save_v4(v4, os.path.join(tmp, "paged_v4_fp4"), naming="released",
                                                 fp4_experts=True), 6 * 3872 + 4096, **v4_args)
    res["gemma4_moe"] = exactness(make_gemma("moe", os.path.join(tmp, "paged_gemma4")), 6 * 24 * 1024)
    res["qwen3_moe_int4"] = exactness(make_tiny("qwen3_moe", os.path.join(tmp, "paged_int4"), **DEEP["qwen3_moe"]),
                                      6 * 4608 + 48 * 1024, quantization="int4")
    shape = dict(QUICK if quick else SHAPE, num_hidden_layers=4 if quick else 16)
    path = make_checkpoint(os.path.join(tmp, "paged_shape"), shape)
    E, L = shape["num_experts"], shape["num_hidden_layers"]
    experts = E * L * 3 * shape["hidden_size"] * shape["moe_intermediate_size"] * 2
    prompt = [[1] + [(13 * i) % 1000 + 3 for i in range(32)]]
    sp = SamplingParams(temperature=0, max_tokens=16 if quick else 64, ignore_eos=True)
    speed = {"experts_gib": experts / 2**30}
    for name, frac, prefetch in (("resident", None, True), ("25%", 0.25, True), ("25% no prefetch", 0.25, False),
                                 ("50%", 0.5, True), ("50% no prefetch", 0.5, False)):
        kw = {} if frac is None else {"expert_cache_memory": int(frac * experts), "expert_prefetch": prefetch}
        with LLM(path, device=dev, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=512,
                 num_kv_blocks=256, speculative="none", **kw) as llm:
            llm.generate(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=4))
            speed[f"{name}_tok_s"] = timed_generate(llm, prompt, sp, dev)
            s = llm.engine.stats()["expert_cache"]
            if s:
                speed[f"{name}_hit_rate"] = s["hit_rate"]
                speed[f"{name}_wait_s"] = s["wait_s"]
                speed[f"{name}_mib_per_token"] = s["bytes_per_token"] / 2**20
    res["speed"] = speed
    return res
