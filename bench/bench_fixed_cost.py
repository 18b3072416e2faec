"""The fixed cost per token at batch 1: what a decode step spends outside the weight products,
with the one-call C decoder (``kernels/decoder.c``) and without it (the Python path).

    OMP_WAIT_POLICY=passive python bench/bench_fixed_cost.py [--tokens 64] [--reps 3]

For each weight format of the default model (fp32 folder, the shipped GGUF Q4_1): decode tok/s
greedy with the C decoder and with it detached (both compute the same bits; decode steps only:
the time of ``--tokens`` tokens less that of the first), and the time of the
step's weight products alone (every product of the model, the head included, run on one row
with the kernels the engine uses, best of ``--reps``). ``ms/token - products`` is the fixed
cost. Engines take turns. Writes bench/results/fixed_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PROMPT = "Write a Python function that checks whether a number is prime."


def products_ms(model, dtype: torch.dtype, reps: int) -> float:
    """ms for one row through every weight product of ``model`` (the head included; the
    embedding is a lookup), each through ``project`` as the layers call it."""
    from dist_engine.layers.linear import project

    def width(m) -> int:
        p = m.weight_packed
        return getattr(p, "in_features", None) or (p.panels.shape[1] if hasattr(p, "panels") else m.weight.shape[1])

    mods = [m for m in model.modules() if getattr(m, "weight_packed", None) is not None
            and type(m).__name__ != "VocabParallelEmbedding"]
    xs = [torch.randn(1, width(m), dtype=dtype) for m in mods]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps):
            t = time.perf_counter()
            for m, x in zip(mods, xs):
                project(m, x)
            best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from dist_engine import LLM, SamplingParams
    from dist_engine.weights.registry import DEFAULT_MODEL, dequantized_folder, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    ids = list(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"])
    sp = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1)
    llms = {"fp32": LLM(dequantized_folder(DEFAULT_MODEL), speculative="none", kv_cache_memory="128MiB",
                         enable_prefix_caching=False),
            "GGUF Q4_1": LLM(DEFAULT_MODEL, speculative="none", kv_cache_memory="128MiB",
                              enable_prefix_caching=False)}
    rows = {}
    try:
        inner = {k: llm.engine.executor.worker.runner.model.model for k, llm in llms.items()}
        drivers = {k: m.cpu_decoder for k, m in inner.items()}
        tok_s = {}
        for _ in range(a.reps):
            for k, llm in llms.items():
                for with_c in (True, False):
                    inner[k].cpu_decoder = drivers[k] if with_c else None
                    # decode only: the time of a.tokens tokens less that of the first one
                    t = time.perf_counter()
                    llm.generate(prompt_token_ids=[ids], sampling_params=first)
                    t1 = time.perf_counter()
                    out = llm.generate(prompt_token_ids=[ids], sampling_params=sp)
                    tn = time.perf_counter()
                    assert len(out[0].outputs[0].token_ids) == a.tokens
                    key = (k, with_c)
                    tok_s[key] = max(tok_s.get(key, 0.0), (a.tokens - 1) / ((tn - t1) - (t1 - t)))
            for k in llms:
                inner[k].cpu_decoder = drivers[k]
        for k, llm in llms.items():
            runner = llm.engine.executor.worker.runner
            prod = products_ms(runner.model, runner.dtype, a.reps)
            c_ms, py_ms = 1e3 / tok_s[(k, True)], 1e3 / tok_s[(k, False)]
            rows[k] = {"tok_s_c_decoder": tok_s[(k, True)], "tok_s_python": tok_s[(k, False)],
                       "products_ms": prod, "fixed_ms_c_decoder": c_ms - prod, "fixed_ms_python": py_ms - prod,
                       "c_decoder_attached": drivers[k] is not None}
    finally:
        for llm in llms.values():
            llm.shutdown()
    lines = ["| weights | tok/s, C decoder / Python path | ms/token | weight products, ms | fixed cost, ms (C / Python) |",
             "|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['tok_s_c_decoder']:.1f} / {r['tok_s_python']:.1f} "
                     f"({r['tok_s_c_decoder'] / r['tok_s_python']:.2f}x) | {1e3 / r['tok_s_c_decoder']:.2f} / "
                     f"{1e3 / r['tok_s_python']:.2f} | {r['products_ms']:.2f} | {r['fixed_ms_c_decoder']:.2f} / "
                     f"{r['fixed_ms_python']:.2f} |")
    table = "\n".join(lines)
    print(table)
    meta = {"tokens": a.tokens, "reps": a.reps, "cpus": os.cpu_count(), "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "date": time.strftime("%Y-%m-%d")}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "fixed_cost.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(os.path.join(RESULTS, "fixed_cost.md"), "w") as f:
        f.write(f"# Fixed cost per token at batch 1 ({meta['date']}, {meta['cpus']} CPUs)\n\n{table}\n")


if __name__ == "__main__":
    main()
