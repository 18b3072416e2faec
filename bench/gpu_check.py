"""GPU check for a lent machine (torch on CUDA, no Ray: the in-process executor).

    python bench/gpu_check.py [--device cuda] [--quick] [--out DIR]

1. Parity with transformers: tiny random models of every architecture the tests sweep
   (tests/conftest.py), fp32 on the device; 24 greedy tokens must be identical and our top-5
   logprobs at each step must match transformers' forward over the same tokens.
2. Speculation is lossless on the device: the tiny Llama's answers generated there (with hidden
   states), an MTP layer grafted on them, then a mixed batch of 8 (greedy and seeded sampling with
   penalties) and batch 1 must equal plain decoding for K = 1..4.
3. Speed, bf16 random weights of the default model's shape and a ~1B Llama shape: batch-1 decode
   tok/s against transformers' generate and against the HBM limit (weight bytes per token),
   16 concurrent requests, and the speed and cost of a K=3 speculative step (a native-style MTP
   layer: a copy of the last decoder layer, drafting every step) relative to a plain step, with
   CUDA graphs (verification and the MTP layer's runs graphed; drafting's head and sampling
   eager) and all eager.
4. Long context through CUDA graphs against eager decode (see ``long_context``).
5. Gemma 4 (see ``gemma4``): the tiny random dense / MoE / E models against transformers on
   the device, CUDA graphs (one block table per paged group) against eager, and bf16 decode
   tok/s of an E2B-like shape and a 3-layer slice of the 26B-A4B's shape against transformers.
6. Quantized weights (``bench/gpu_quant.py``): every checkpoint format against its float
   weights on the device, and int4 / int8 decode speed against bf16.
7. Drafter-model speculation (``bench/gpu_drafters.py``): Gemma 4 assistant and DFlash drafters
   lossless against plain decoding on the device, and what drafting costs per token; then
   ``graft-dflash`` on the device (answers, training and speculation there).
8. Routed experts paged under --expert-cache-memory on the device (``bench/gpu_experts.py``):
   the tiny Qwen3-MoE, DeepSeek-V3, Qwen3.5-MoE, DeepSeek-V4 (float and MXFP4), Gemma 4 MoE and
   int4 (--quantization) experts with a few resident against all resident (tokens and logprobs), then a bf16 random MoE shape (bench/bench_expert_cache.py's checkpoint, smaller):
   decode tok/s all resident vs device caches of 25% and 50% of the experts fed from pinned host
   memory, prefetch on and off, with hit rates and time spent waiting for copies.
7. TurboQuant KV cache on the device (PyTorch path: gathered rows dequantized in the rotated
   basis, under CUDA graphs): the tiny long-context Llama's greedy tokens with turboquant4 / 3
   through graphs against eager and against the same cache on CPU (C kernels), the top-5 logprob
   distance from the exact cache, and the 1B shape's decode tok/s at a 3500-token context per
   cache format (see ``turboquant``).
8. Qwen3.5 hybrid Gated DeltaNet (``bench/gpu_qwen3_5.py``): parity, MTP and prefix-cache
   exactness on the device, decode speed per context against a Llama of the same hidden size.
Each part records its error and the rest still run. Writes gpu_check.json and gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

SHAPES = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                               tie_word_embeddings=True),
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                           tie_word_embeddings=True),
}
HBM_BYTES_PER_S = 4.8e12  # H200
_S, _F = "sliding_attention", "full_attention"
GEMMA4_SHAPES = {  # bf16 random weights made by transformers on the device; vocabulary cut to 64k
    # (the real 262k would add gigabytes to write and load and nothing to the per-layer work)
    "gemma4-e2b-shape": dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                             layer_types=[_F if (i + 1) % 5 == 0 else _S for i in range(35)],
                             num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                             global_head_dim=512, sliding_window=512, hidden_size_per_layer_input=256,
                             num_kv_shared_layers=20, use_double_wide_mlp=True, vocab_size=65536,
                             vocab_size_per_layer_input=65536,
                             final_logit_softcapping=30.0),
    "gemma4-26b-a4b-3-layers": dict(hidden_size=2816, intermediate_size=2112, num_hidden_layers=3,
                                    layer_types=[_S, _S, _F], num_attention_heads=16, num_key_value_heads=8,
                                    head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                                    attention_k_eq_v=True, sliding_window=1024, enable_moe_block=True,
                                    num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                                    hidden_size_per_layer_input=0, vocab_size=65536,
                                    final_logit_softcapping=30.0),
}


def guarded(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a failed part is a result too
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def against_transformers(hf, prompt: list[int], out, dev: str) -> dict:
    """Our greedy ``out`` (a CompletionOutput with top logprobs) against transformers' ``hf``
    on ``prompt``: the same tokens, and the largest logprob difference."""
    n = len(out.token_ids)
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=dev)
        ref = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
        full = torch.tensor([prompt + out.token_ids], device=dev)
        ref_lp = torch.log_softmax(hf(full).logits[0].float(), -1)[len(prompt) - 1:]
    err = max(abs(lp - ref_lp[i, t].item()) for i, step in enumerate(out.logprobs) for t, lp in step.items())
    return {"greedy_identical": out.token_ids == ref, "max_logprob_err": err}


def transformers_tok_s(hf, ids: torch.Tensor, tokens: int, dev: str) -> float:
    """transformers' batch-1 greedy decode rate on ``ids``: best of two timed runs after a warm-up."""
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        best = 0.0
        for _ in range(2):
            sync(dev)
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            sync(dev)
            best = max(best, tokens / (time.perf_counter() - t))
    return best


def parity(tmp: str, dev: str, arch: str) -> dict:
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny
    from dist_engine import LLM, SamplingParams

    path = make_tiny(arch, os.path.join(tmp, arch))
    prompt = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12]
    n = 24
    with LLM(path, device=dev, skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64,
             speculative="none") as llm:
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            temperature=0, max_tokens=n, ignore_eos=True, logprobs=5))[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    return against_transformers(hf, prompt, out, dev)


def speculation(tmp: str, dev: str) -> dict:
    from test_spec_decode import ARGS, LENS, PROMPTS, mixed_params, spec

    from conftest import graft_tiny, make_tiny
    from dist_engine import LLM, SamplingParams

    path = make_tiny("llama", os.path.join(tmp, "spec_llama"))
    folder = os.path.join(tmp, "spec_graft")
    meta = graft_tiny(path, folder, dev)  # answers generated on the device

    def run(params, prompts, **kw):
        with LLM(path, device=dev, **{**ARGS, **kw}) as llm:
            got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
            return got, llm.engine.spec_stats.mean_accepted_length

    res = {"graft_held_out": meta.get("held_out"), "identical": {}, "mean_accepted_length": {}}
    one = SamplingParams(temperature=0, max_tokens=max(LENS), ignore_eos=True)
    plain_mixed, _ = run(mixed_params(), PROMPTS)
    plain_one, _ = run(one, PROMPTS[:1])
    for k in (1, 2, 3, 4):
        got, mal = run(mixed_params(), PROMPTS, speculative_config=spec(folder, k))
        got1, _ = run(one, PROMPTS[:1], speculative_config=spec(folder, k))
        res["identical"][k] = got == plain_mixed and got1 == plain_one
        res["mean_accepted_length"][k] = mal
    return res


def long_context(tmp: str, dev: str) -> dict:
    """Decode at a long context through graphs against eager: the tiny long-context Llama in
    fp32 (a 3000-token prompt, 32 greedy tokens and their top-5 logprobs), and the 1B shape in
    bf16 (tok/s at a 3500-token context)."""
    from conftest import make_tiny
    from dist_engine import LLM, SamplingParams

    path = make_tiny("llama1kv_long", os.path.join(tmp, "long"))
    prompt = [[1] + [(37 * i) % 300 + 3 for i in range(3000)]]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)
    outs = {}
    for eager in (False, True):
        with LLM(path, device=dev, skip_tokenizer_init=True, max_model_len=6144, enforce_eager=eager,
                 speculative="none") as llm:
            outs[eager] = llm.generate(prompt_token_ids=prompt, sampling_params=sp)[0].outputs[0]
    g, e = outs[False], outs[True]
    res = {"tiny_identical": g.token_ids == e.token_ids,
           "tiny_max_logprob_diff": max(abs(a[t] - b[t]) for a, b in zip(g.logprobs, e.logprobs) for t in a)}
    path = os.path.join(tmp, "llama-1b-shape")
    if os.path.isdir(path):
        long = [[1] + [(7 * i) % 1000 + 3 for i in range(3500)]]
        sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        for eager in (False, True):
            with LLM(path, device=dev, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=4096,
                     num_kv_blocks=2048, enforce_eager=eager, speculative="none") as llm:
                llm.generate(prompt_token_ids=long, sampling_params=SamplingParams(max_tokens=4))
                res[f"1b_ctx3500_{'eager' if eager else 'graphs'}_tok_s"] = timed_generate(llm, long, sp, dev)
    return res


def turboquant(tmp: str, dev: str) -> dict:
    """TurboQuant caches on the device against eager, CPU and the exact cache (tiny Llama, fp32,
    a 3000-token prompt, 32 greedy tokens), and decode speed per format (1B shape, bf16)."""
    from conftest import make_tiny
    from dist_engine import LLM, SamplingParams

    path = os.path.join(tmp, "long")
    if not os.path.isdir(path):
        make_tiny("llama1kv_long", path)
    prompt = [[1] + [(37 * i) % 300 + 3 for i in range(3000)]]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)
    res: dict = {}

    def greedy(fmt: str, device: str, eager: bool):
        with LLM(path, device=device, skip_tokenizer_init=True, max_model_len=6144, enforce_eager=eager,
                 speculative="none", kv_cache_dtype=fmt, num_kv_blocks=400) as llm:
            return llm.generate(prompt_token_ids=prompt, sampling_params=sp)[0].outputs[0]

    exact = greedy("auto", dev, False)
    for fmt in ("turboquant4", "turboquant3"):
        g, e, c = greedy(fmt, dev, False), greedy(fmt, dev, True), greedy(fmt, "cpu", True)
        res[fmt] = {"graphs_equal_eager": g.token_ids == e.token_ids,
                    "device_equals_cpu_tokens": g.token_ids == c.token_ids,
                    "first_token_top5_vs_exact": max(abs(g.logprobs[0][t] - exact.logprobs[0][t])
                                                     for t in g.logprobs[0] if t in exact.logprobs[0])}
    path = os.path.join(tmp, "llama-1b-shape")
    if os.path.isdir(path):
        long = [[1] + [(7 * i) % 1000 + 3 for i in range(3500)]]
        sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        for fmt in ("auto", "fp8_e4m3", "turboquant4", "turboquant3"):
            with LLM(path, device=dev, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=4096,
                     kv_cache_dtype=fmt, speculative="none") as llm:
                llm.generate(prompt_token_ids=long, sampling_params=SamplingParams(max_tokens=4))
                res[f"1b_ctx3500_{fmt}_tok_s"] = timed_generate(llm, long, sp, dev)
                res[f"1b_{fmt}_bytes_per_token"] = llm.engine.cache_info["bytes_per_block"] // 16
    return res


def make_shape(tmp: str, name: str, kw: dict, dev: str, mtp: bool) -> str:
    """Random bf16 weights of a shape; ``mtp`` adds a native-style MTP layer (DeepSeek naming)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.path.join(tmp, name)
    cfg = LlamaConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    if mtp:
        n, h = cfg.num_hidden_layers, cfg.hidden_size
        state = model.state_dict()
        last = f"model.layers.{n - 1}."
        w = {f"model.layers.{n}.{k[len(last):]}": v.clone() for k, v in state.items() if k.startswith(last)}
        one = torch.ones(h, dtype=torch.bfloat16, device=dev)
        w.update({f"model.layers.{n}.enorm.weight": one.clone(), f"model.layers.{n}.hnorm.weight": one.clone(),
                  f"model.layers.{n}.shared_head.norm.weight": one.clone(),
                  f"model.layers.{n}.eh_proj.weight": torch.randn(h, 2 * h, device=dev).mul(0.02).bfloat16(),
                  f"model.layers.{n}.embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
                  f"model.layers.{n}.shared_head.head.weight": state["model.embed_tokens.weight"].clone()})
        save_file({k: v.contiguous().cpu() for k, v in w.items()}, os.path.join(path, "model-mtp.safetensors"))
        c = json.load(open(os.path.join(path, "config.json")))
        json.dump({**c, "num_nextn_predict_layers": 1}, open(os.path.join(path, "config.json"), "w"))
    del model
    return path


def byte_tokenizer(folder: str):
    """A byte-level BPE tokenizer without merges (256 byte tokens + <eos>), saved into ``folder``:
    structured output needs a real tokenizer, and this machine may have no model files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    hf.save_pretrained(folder)
    return hf


def structured(tmp: str, dev: str, quick: bool) -> dict:
    """Grammar-constrained decoding on the device: every output matches, greedy and seeded
    output is the same eager and with CUDA graphs, and what the masks cost per token (TPOT with
    and without a regex, batch 1 and 16)."""
    import re

    from conftest import make_tiny
    from dist_engine import LLM, SamplingParams
    from dist_engine.engine.structured import StructuredOutputs

    path = os.path.join(tmp, "structured_llama")
    make_tiny("llama", path, vocab_size=257, eos_token_id=256, bos_token_id=256)
    byte_tokenizer(path)
    pattern = r"\{\"id\": [0-9]{1,6}, \"ok\": (true|false)\}"
    so = StructuredOutputs(regex=pattern)
    prompts = [[(7 * i + j) % 200 + 32 for j in range(12)] for i in range(16)]
    res = {}
    outs = {}
    for eager in (True, False):
        with LLM(path, device=dev, max_model_len=256, enforce_eager=eager) as llm:
            params = [SamplingParams(temperature=0 if i == 0 else 1.0, seed=i, max_tokens=40,
                                     structured_outputs=so) for i in range(16)]
            got = llm.generate(prompt_token_ids=prompts, sampling_params=params)
            outs[eager] = [o.outputs[0].token_ids for o in got]
            res[f"all_match_{'eager' if eager else 'graphs'}"] = all(
                re.fullmatch(pattern, o.outputs[0].text) for o in got)
            for batch in (1, 16):
                n = 2 if quick else 4
                free = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
                cons = SamplingParams(temperature=0, max_tokens=32, structured_outputs=StructuredOutputs(
                    regex="[a-z ]{32}"))  # 32 tokens either way
                t_free = sum(timed_generate(llm, prompts[:batch], free, dev) for _ in range(n)) / n
                t_cons = sum(timed_generate(llm, prompts[:batch], cons, dev) for _ in range(n)) / n
                res[f"{'eager' if eager else 'graphs'}_batch{batch}_tok_s_free_vs_regex"] = (
                    round(t_free, 1), round(t_cons, 1))
    res["graphs_equal_eager"] = outs[True] == outs[False]
    return res


def timed_generate(llm, prompts, params, dev: str) -> float:
    sync(dev)
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    sync(dev)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def speed(tmp: str, dev: str, name: str, kw: dict, tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from dist_engine import LLM, SamplingParams

    path = make_shape(tmp, name, kw, dev, mtp=True)
    prompt = [[1] + [(7 * i) % 1000 + 3 for i in range(31)]]
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    res = {}
    args = dict(device=dev, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024, num_kv_blocks=2048)
    many = [[1, 5 + i] + prompt[0][2:] for i in range(16)]
    tokens_of = {}
    for eager in (False, True):  # CUDA graphs for decode, then every step eager
        with LLM(path, enforce_eager=eager, speculative="none", **args) as llm:
            llm.generate(prompt_token_ids=prompt, sampling_params=warm)
            key = "eager_" if eager else ""
            res[f"{key}plain_tok_s"] = max(timed_generate(llm, prompt, sp, dev) for _ in range(2))
            res[f"{key}c16_tok_s"] = timed_generate(llm, many, sp, dev)
            res["weight_bytes"] = llm.engine.executor.cache_info()["weight_bytes"]
            graphs = llm.engine.executor.worker.runner.graphs
            if graphs is not None:
                res["graph_steps"], res["graphs_recorded"] = graphs.num_steps, len(graphs.graphs)
            tokens_of[eager] = llm.generate(prompt_token_ids=prompt, sampling_params=sp)[0].outputs[0].token_ids
    # bf16 on random weights: near-ties are common, so report where the two first differ
    same = [a == b for a, b in zip(tokens_of[False], tokens_of[True])]
    res["graph_vs_eager_first_difference"] = same.index(False) if False in same else None
    res["graph_speedup"] = res["plain_tok_s"] / res["eager_plain_tok_s"]
    for eager in (False, True):  # verification and MTP runs through CUDA graphs, then all eager
        key = "eager_" if eager else ""
        with LLM(path, enforce_eager=eager, speculative_config={
                "num_speculative_tokens": 3, "min_draft_acceptance": 0.0, "max_draft_tokens_per_step": 0},
                **args) as llm:
            llm.generate(prompt_token_ids=prompt, sampling_params=warm)
            before = llm.engine.spec_stats.as_dict()
            res[f"{key}k3_tok_s"] = timed_generate(llm, prompt, sp, dev)
            after = llm.engine.spec_stats.as_dict()
            graphs = llm.engine.executor.worker.runner.graphs
            if graphs is not None:
                res["k3_graph_steps"] = graphs.num_steps
        steps = after["num_steps"] - before["num_steps"]
        res[f"{key}k3_mean_accepted_length"] = (tokens - 1) / max(steps, 1)
        # a K=3 step's time over a plain step's, both graphed or both eager:
        # (tokens per K=3 step / K=3 tok/s) / (1 / plain tok/s)
        res[f"{key}k3_step_cost_vs_plain"] = (res[f"{key}k3_mean_accepted_length"]
                                             * res[f"{key}plain_tok_s"] / res[f"{key}k3_tok_s"])
        res[f"{key}k3_vs_plain"] = res[f"{key}k3_tok_s"] / res[f"{key}plain_tok_s"]
    res["hbm_limit_tok_s"] = HBM_BYTES_PER_S / res["weight_bytes"]
    res["fraction_of_limit"] = res["plain_tok_s"] / res["hbm_limit_tok_s"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()
    ids = torch.tensor(prompt, device=dev)
    best = transformers_tok_s(hf, ids, tokens, dev)
    res["transformers_tok_s"] = best
    res["vs_transformers"] = res["plain_tok_s"] / best
    del hf
    return res


def gemma4(tmp: str, dev: str, tokens: int, quick: bool) -> dict:
    """Gemma 4 on the device. Tiny random dense / MoE / E models (tests/gemma4_tiny.py, fp32):
    24 greedy tokens and top-5 logprobs against transformers there, CUDA graphs against eager
    (MoE stays eager). Then bf16 random shapes: batch-1 decode tok/s, graphs and eager, against
    transformers' generate."""
    from bench_gemma4 import make_shape
    from gemma4_tiny import make
    from transformers import AutoModelForCausalLM

    from dist_engine import LLM, SamplingParams

    res: dict = {}
    prompt = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4]
    n = 24
    for name in ("dense", "moe", "e"):
        path = make(name, os.path.join(tmp, f"gemma4-{name}"))
        outs = {}
        for eager in (False, True):
            with LLM(path, device=dev, skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64,
                     block_size=4, enforce_eager=eager) as llm:
                outs[eager] = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
                    temperature=0, max_tokens=n, ignore_eos=True, logprobs=5))[0].outputs[0]
                graphs = llm.engine.executor.worker.runner.graphs
                if not eager:
                    res[f"{name}_graph_steps"] = graphs.num_steps if graphs is not None else 0
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
        with torch.inference_mode():
            ids = torch.tensor([prompt], device=dev)
            ref = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
            full = torch.tensor([prompt + outs[False].token_ids], device=dev)
            ref_lp = torch.log_softmax(hf(full).logits[0].float(), -1)[len(prompt) - 1:]
        g, e = outs[False], outs[True]
        res[name] = {"greedy_identical": g.token_ids == ref == e.token_ids,
                     "max_logprob_err": max(abs(lp - ref_lp[i, t].item())
                                            for i, step in enumerate(g.logprobs) for t, lp in step.items()),
                     "graphs_vs_eager_max_logprob_diff": max(abs(a[t] - b[t]) for a, b in zip(g.logprobs, e.logprobs)
                                                            for t in a)}
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    long_prompt = [[1] + [(7 * i) % 1000 + 3 for i in range(1500)]]  # past both windows
    for name, kw in list(GEMMA4_SHAPES.items())[: 1 if quick else 2]:
        shape = dict(kw, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        if quick:  # a dry run: ten layers (the last four KV-shared), a small vocabulary
            shape.update(vocab_size=8192, vocab_size_per_layer_input=8192, num_hidden_layers=10,
                         layer_types=kw["layer_types"][:10],
                         num_kv_shared_layers=4)
        path = make_shape(os.path.join(tmp, name), shape, torch.bfloat16, dev)
        r: dict = {}
        for eager in (False, True):
            key = "eager_" if eager else ""
            with LLM(path, device=dev, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=2048,
                     num_kv_blocks=1024, enforce_eager=eager) as llm:
                llm.generate(prompt_token_ids=[long_prompt[0][:32]], sampling_params=warm)
                r[f"{key}tok_s"] = max(timed_generate(llm, [long_prompt[0][:32]], sp, dev) for _ in range(2))
                r[f"{key}ctx1500_tok_s"] = timed_generate(llm, long_prompt, sp, dev)
                r["weight_bytes"] = llm.engine.executor.cache_info()["weight_bytes"]
                r["kv_bytes_per_token_by_group"] = {g: b / 16 for g, b in
                                                    llm.engine.cache_info["bytes_per_block_by_group"].items()}
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()
        ids = torch.tensor([long_prompt[0][:32]], device=dev)
        best = transformers_tok_s(hf, ids, tokens, dev)
        del hf
        r["transformers_tok_s"], r["vs_transformers"] = best, r["tok_s"] / best
        res[name] = r
    return res


def report(res: dict) -> str:
    lines = [f"# GPU check: {res['device']}, torch {res['torch']}", "", "## Parity (fp32, 24 greedy tokens)", "",
             "| arch | greedy identical | max top-5 logprob error |", "|---|---|---|"]
    for arch, r in res.get("parity", {}).items():
        lines.append(f"| {arch} | {r.get('greedy_identical', r.get('error'))} | {r.get('max_logprob_err', '')} |")
    s = res.get("speculation", {})
    lines += ["", "## Speculation on the device (tiny Llama grafted on its own answers generated there)", "",
              f"- identical to plain (mixed batch of 8 and batch 1) per K: {s.get('identical', s.get('error'))}",
              f"- mean accepted length per K: {s.get('mean_accepted_length')}", "",
              "## Decode speed, bf16 random weights, batch 1 unless said", "",
              "| shape | ours tok/s (graphs / eager) | transformers tok/s | ratio | HBM limit "
              "| 16 concurrent tok/s (graphs / eager) | K=3 tok/s vs plain (graphs / eager) "
              "| K=3 step / plain step (graphs / eager) |",
              "|---|---|---|---|---|---|---|---|"]
    for name in SHAPES:
        r = res.get(name) or {}
        if "plain_tok_s" in r:
            lines.append(f"| {name} | {r['plain_tok_s']:.0f} / {r['eager_plain_tok_s']:.0f} | "
                         f"{r['transformers_tok_s']:.0f} | {r['vs_transformers']:.2f}x | {r['hbm_limit_tok_s']:.0f} | "
                         f"{r['c16_tok_s']:.0f} / {r['eager_c16_tok_s']:.0f} | "
                         f"{r['k3_vs_plain']:.2f}x / {r['eager_k3_vs_plain']:.2f}x | "
                         f"{r['k3_step_cost_vs_plain']:.2f} / {r['eager_k3_step_cost_vs_plain']:.2f} |")
        elif r:
            lines.append(f"| {name} | {r.get('error')} | | | | | | |")
    if "long_context" in res:
        lines += ["", "## Long context, CUDA graphs vs eager", "", f"`{json.dumps(res['long_context'])}`"]
    if "drafters" in res:
        lines += ["", "## Drafter-model speculation (tiny Gemma 4, assistant and DFlash drafters)", "",
                  f"`{json.dumps(res['drafters'])}`"]
    if "graft_dflash" in res:
        lines += ["", "## graft-dflash on the device (tiny Llama, drafter trained there; CPU floor 1.8)", "",
                  f"`{json.dumps(res['graft_dflash'])}`"]
    if "gemma4" in res:
        lines += ["", "## Gemma 4 (tiny fp32 parity, graphs vs eager; bf16 shapes, batch 1)", "",
                  f"`{json.dumps(res['gemma4'])}`"]
    if "structured" in res:
        lines += ["", "## Structured output (regex grammar on a byte-level tiny Llama)", "",
                  f"`{json.dumps(res['structured'])}`"]
    if "quant" in res:
        from gpu_quant import report as quant_report

        lines += quant_report(res["quant"])
    if "deepseek_v4" in res:
        from gpu_deepseek_v4 import report as v4_report

        lines += v4_report(res["deepseek_v4"])
    if "expert_cache" in res:
        lines += ["", "## Routed experts paged into a device cache (from pinned host memory)", "",
                  f"`{json.dumps(res['expert_cache'])}`"]
    if "turboquant" in res:
        lines += ["", "## TurboQuant KV cache on the device", "", f"`{json.dumps(res['turboquant'])}`"]
    if "qwen3_5" in res:
        from gpu_qwen3_5 import report as qwen3_5_report

        lines += qwen3_5_report(res["qwen3_5"])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a dry run: two archs, the small shape, 16 tokens")
    ap.add_argument("--parts", default="parity,speculation,speed,long,structured,quant,experts,deepseek_v4,turboquant,qwen3_5,gemma4,drafters",
                    help="comma-separated")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "bench", "results")))
    a = ap.parse_args()
    from conftest import ARCHS

    dev = a.device
    res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__}
    t0 = time.time()

    def save(part: str) -> None:
        print(part, json.dumps(res[part]), f"{time.time() - t0:.0f}s", flush=True)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
            json.dump(res, f, indent=2)
        with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
            f.write(report(res))

    with tempfile.TemporaryDirectory() as tmp:
        parts = a.parts.split(",")
        if "parity" in parts:
            res["parity"] = {arch: guarded(parity, tmp, dev, arch) for arch in (ARCHS[:2] if a.quick else ARCHS)}
            save("parity")
        if "speculation" in parts:
            res["speculation"] = guarded(speculation, tmp, dev)
            save("speculation")
        for name, kw in list(SHAPES.items())[: 0 if "speed" not in parts else 1 if a.quick else 2]:
            res[name] = guarded(speed, tmp, dev, name, kw, 16 if a.quick else 128)
            save(name)
        if "long" in parts:
            res["long_context"] = guarded(long_context, tmp, dev)
            save("long_context")
        if "gemma4" in parts:
            res["gemma4"] = guarded(gemma4, tmp, dev, 16 if a.quick else 128, a.quick)
            save("gemma4")
        if "structured" in parts:
            res["structured"] = guarded(structured, tmp, dev, a.quick)
            save("structured")
        if "quant" in parts:
            import gpu_quant

            res["quant"] = {"correctness": guarded(gpu_quant.correctness, tmp, dev),
                            "speed": guarded(gpu_quant.speed, tmp, dev, make_shape,
                                             SHAPES["smollm2-135m-shape"], 16 if a.quick else 128)}
            save("quant")
        if "drafters" in parts:
            import gpu_drafters

            res["drafters"] = guarded(gpu_drafters.drafters, tmp, dev, a.quick)
            save("drafters")
            res["graft_dflash"] = guarded(gpu_drafters.graft_dflash, tmp, dev)
            save("graft_dflash")
        if "experts" in parts:
            import gpu_experts

            res["expert_cache"] = guarded(gpu_experts.expert_cache, tmp, dev, a.quick)
            save("expert_cache")
        if "deepseek_v4" in parts:
            import gpu_deepseek_v4

            res["deepseek_v4"] = {"parity": guarded(gpu_deepseek_v4.parity, tmp, dev),
                                  "steps": guarded(gpu_deepseek_v4.step_times, tmp, dev, a.quick)}
            save("deepseek_v4")
        if "turboquant" in parts:
            res["turboquant"] = guarded(turboquant, tmp, dev)
            save("turboquant")
        if "qwen3_5" in parts:
            import gpu_qwen3_5

            res["qwen3_5"] = gpu_qwen3_5.check(tmp, dev, a.quick, guarded)
            save("qwen3_5")


if __name__ == "__main__":
    main()
