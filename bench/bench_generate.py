"""Batch-1 generation speed: dist_engine vs transformers (and llama.cpp if installed), one run.

    python bench/bench_generate.py [--tokens 128] [--dtypes float32,bfloat16] [--tp 1,2]

Same weights (the default model's converted folder), same chat prompt, greedy, fixed number of
new tokens (EOS ignored). Every engine of a dtype is loaded at once and they take turns for
``--reps`` rounds, each keeping its best. Prints tok/s per engine and the ratios; writes a JSON
+ Markdown table to bench/results/. These machines are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

PROMPT = "Write a Python function that checks whether a number is prime."
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def ours(path: str, ids: list[int], n: int, dtype: str, tp: int):
    """(one timed generation -> tok/s, shutdown) for our engine, loaded and warmed up."""
    from dist_engine import LLM, SamplingParams

    llm = LLM(path, tensor_parallel_size=tp, dtype=dtype, max_model_len=1024,
              enable_prefix_caching=False, speculative="none")
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(temperature=0, max_tokens=4))

    def run() -> float:
        t = time.perf_counter()
        out = llm.generate(prompt_token_ids=[ids], sampling_params=sp)
        dt = time.perf_counter() - t
        assert len(out[0].outputs[0].token_ids) == n
        return n / dt

    return run, llm.shutdown


def transformers(path: str, ids: list[int], n: int, dtype: str):
    """(one timed ``generate`` -> tok/s, cleanup) for transformers, loaded and warmed up."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, do_sample=False)

    def run() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return n / (time.perf_counter() - t)

    return run, lambda: None


def bench_llamacpp(gguf: str, prompt_ids: list[int], n: int, reps: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    best = 0.0
    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        got = 0
        for _tok in llm.generate(prompt_ids, temp=0.0):
            got += 1
            if got == n:
                break
        best = max(best, n / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--reps", type=int, default=3, help="rounds; each engine keeps its best")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from dist_engine.weights.registry import KNOWN_MODELS, dequantized_folder, fetch_gguf

    path = dequantized_folder(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    ids = list(tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                       add_generation_prompt=True, tokenize=True))
    if hasattr(ids, "keys") or (ids and isinstance(ids[0], str)):
        ids = list(tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                           add_generation_prompt=True, return_dict=True)["input_ids"])
    rows = []
    for dtype in a.dtypes.split(","):
        # every engine loaded at once; they take turns each round and keep their best, so the
        # machine's drifts in speed hit them alike
        runners = {}
        try:
            runners[("transformers", 1)] = transformers(path, ids, a.tokens, dtype)
            for tp in dict.fromkeys(map(int, a.tp.split(","))):
                runners[("dist_engine", tp)] = ours(path, ids, a.tokens, dtype, tp)
            best = dict.fromkeys(runners, 0.0)
            for _ in range(a.reps):
                for key, (run, _close) in runners.items():
                    best[key] = max(best[key], run())
        finally:
            for _run, close in runners.values():
                close()
        hf = best[("transformers", 1)]
        for (engine, tp), tok_s in best.items():
            rows.append({"engine": engine, "dtype": dtype, "tp": tp, "tok_s": tok_s,
                         **({"vs_transformers": tok_s / hf} if engine == "dist_engine" else {})})
    if a.model in KNOWN_MODELS:
        lc = bench_llamacpp(fetch_gguf(a.model), ids, a.tokens, a.reps)
        if lc is not None:
            rows.append({"engine": "llama.cpp (Q4_1)", "dtype": "q4_1", "tp": 1, "tok_s": lc})
    tp1 = {r["dtype"]: r["tok_s"] for r in rows if r["engine"] == "dist_engine" and r["tp"] == 1}
    for r in rows:
        if r["engine"] == "dist_engine" and r["tp"] > 1 and r["dtype"] in tp1:
            r["vs_tp1"] = r["tok_s"] / tp1[r["dtype"]]
    lines = ["| engine | dtype | TP | tok/s | vs transformers | vs our TP=1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        vt = f"{r['vs_transformers']:.2f}x" if "vs_transformers" in r else ""
        v1 = f"{r['vs_tp1']:.2f}x" if "vs_tp1" in r else ""
        lines.append(f"| {r['engine']} | {r['dtype']} | {r['tp']} | {r['tok_s']:.1f} | {vt} | {v1} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    meta = {"tokens": a.tokens, "prompt": PROMPT, "batch": 1, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    with open(os.path.join(RESULTS, "generate.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(os.path.join(RESULTS, "generate.md"), "w") as f:
        f.write(f"Batch 1, {a.tokens} greedy tokens, {meta['cpus']} CPUs, torch {meta['torch']}, "
                f"{meta['date']}\n\n{table}\n")


if __name__ == "__main__":
    main()
