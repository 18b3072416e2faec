"""Serving throughput and latency at 1/4/16/64 concurrent requests, and prefix-cache TTFT.

    python bench/bench_serving.py [--concurrency 1,4,16,64] [--rounds 2] [--skip-transformers]

The workload (fixed seed): chat prompts of mixed length (about 20-130 tokens) and output lengths
drawn from 16-64 tokens, sampled at temperature 0.8 with a seed per request, EOS ignored so
every engine produces the same number of tokens. Ours runs closed-loop: C requests in flight,
a new one joins as one finishes, 4C requests in all (8 to 128; every level draws from one
list, so they share the mix) and the table reports the time-averaged number in flight. The
levels take turns for ``--rounds`` rounds (rates are tokens over seconds of all rounds), so the
machine's drifts in speed hit them alike.
transformers runs the same
requests as padded batches of C with ``generate`` (each batch runs to its longest request;
only requested tokens count). llama.cpp joins where llama-cpp-python is installed (sequential:
it has no batching API). Then TTFT with a shared ~500-token system prompt, prefix caching on
vs off. Results go to bench/results/serving.{json,md}; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")
WORDS = ("the river model engine token cache light value system quiet green stone paper fast "
         "answer question window number garden music simple history future ocean reason city "
         "machine small large story bright winter summer friend signal memory").split()


def workload(tok, n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 110)))
        msgs = [{"role": "user", "content": f"Request {i}: summarise this: {text}"}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        out.append((list(ids["input_ids"]), rng.randint(16, 64)))
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def run_ours(llm, reqs: list[tuple[list[int], int]], concurrency: int) -> dict:
    from dist_engine import SamplingParams

    eng = llm.engine
    pending = list(enumerate(reqs))
    done, tokens = [], 0
    in_flight = 0.0  # request-seconds, for the time-averaged number of requests in flight
    t0 = last = time.perf_counter()
    while pending or eng.has_unfinished():
        while pending and len(eng.requests) < concurrency:
            i, (ids, n) = pending.pop(0)
            eng.add_request(f"r{i}", ids, SamplingParams(temperature=0.8, seed=i, max_tokens=n,
                                                         ignore_eos=True))
        running = len(eng.requests)
        outs = eng.step()
        now = time.perf_counter()
        in_flight += running * (now - last)
        last = now
        for out in outs:
            if out.finished:
                done.append(out)
                tokens += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": elapsed, "in_flight_seconds": in_flight,
            "ttft": [o.metrics.time_to_first_token for o in done],
            "tpot": [o.metrics.time_per_output_token for o in done if o.metrics.time_per_output_token]}


def summarize(runs: list[dict]) -> dict:
    """One level's rounds together: tokens over seconds, the time-averaged number in flight,
    latency percentiles over every request."""
    tokens, secs = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    ttft = [x for r in runs for x in r["ttft"]]
    tpot = [x for r in runs for x in r["tpot"]]
    return {"tok_s": tokens / secs, "tokens": tokens, "seconds": secs, "rounds": len(runs),
            "tok_s_per_round": [round(r["tokens"] / r["seconds"], 2) for r in runs],
            "mean_in_flight": sum(r["in_flight_seconds"] for r in runs) / secs,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99)}


def run_transformers(model, tok, reqs: list[tuple[list[int], int]], concurrency: int) -> dict:
    tokens, t0 = 0, time.perf_counter()
    for b in range(0, len(reqs), concurrency):
        batch = reqs[b:b + concurrency]
        width = max(len(ids) for ids, _ in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        x = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch])
        n = max(m for _, m in batch)
        with torch.inference_mode():
            model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=True, temperature=0.8, pad_token_id=pad)
        tokens += sum(m for _, m in batch)
    elapsed = time.perf_counter() - t0
    return {"tok_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed}


def run_llamacpp(gguf: str, reqs: list[tuple[list[int], int]]) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    tokens, t0 = 0, time.perf_counter()
    for ids, n in reqs:
        llm.reset()
        for got, _tok in enumerate(llm.generate(ids, temp=0.8), start=1):
            if got == n:
                break
        tokens += n
    elapsed = time.perf_counter() - t0
    return {"tok_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed}


def prefix_ttft(path: str, tok, caching: bool, later: int = 6) -> list[float]:
    from dist_engine import LLM, SamplingParams

    system = ("You are the support assistant of a company that builds inference engines. " + " ".join(
        f"Rule {i}: answer {WORDS[i % len(WORDS)]} questions about {WORDS[(i * 7) % len(WORDS)]} "
        f"politely and cite the {WORDS[(i * 3) % len(WORDS)]} handbook." for i in range(26)))
    llm = LLM(path, max_model_len=1024, enable_prefix_caching=caching, speculative="none")
    try:
        ttft = []
        for i in range(later + 1):
            ids = llm.apply_chat_template([{"role": "system", "content": system},
                                           {"role": "user", "content": f"Question {i}: how do I "
                                            f"reset the {WORDS[i]} {WORDS[i + 5]}?"}])
            out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
                temperature=0, max_tokens=4, ignore_eos=True))[0]
            ttft.append(out.metrics.time_to_first_token)
        print(f"  prefix caching {'on ' if caching else 'off'}: prompt {len(ids)} tokens, "
              f"TTFT first {ttft[0] * 1e3:.0f} ms, later p50 {statistics.median(ttft[1:]) * 1e3:.0f} ms")
        return ttft
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--max-requests", type=int, default=128, help="requests per level at most")
    ap.add_argument("--rounds", type=int, default=2, help="rounds in which the levels take turns")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_engine import LLM
    from dist_engine.weights.registry import KNOWN_MODELS, dequantized_folder, fetch_gguf

    path = dequantized_folder(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    levels = [int(c) for c in a.concurrency.split(",")]
    rows = []
    llm = LLM(path, max_model_len=1024, speculative="none")
    hf = None if a.skip_transformers else AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32).eval()
    gguf = fetch_gguf(a.model) if a.model in KNOWN_MODELS else None
    # the same request mix at every level (level C runs the first n of one list); 4C requests
    # (8 at least, 128 at most) so that the ramp-up and the final drain, when fewer than C are
    # left, weigh little in the C-concurrent rate
    reqs = {c: workload(tok, max(8, min(4 * c, a.max_requests)), seed=0) for c in levels}
    runs: dict[int, list[dict]] = {c: [] for c in levels}
    try:
        # the levels take turns for --rounds rounds, so a drift of the machine's speed hits
        # them alike (the vs-C=1 ratios are the point)
        for rnd in range(a.rounds):
            for c in levels:
                runs[c].append(run_ours(llm, reqs[c], c))
                r = runs[c][-1]
                print(f"round {rnd + 1} C={c}: ours {r['tokens'] / r['seconds']:.1f} tok/s", flush=True)
        for c in levels:
            ours = summarize(runs[c])
            row = {"concurrency": c, "requests": len(reqs[c]), "dist_engine": ours}
            if hf is not None:
                torch.manual_seed(0)
                row["transformers"] = run_transformers(hf, tok, reqs[c], c)
            if gguf is not None and c == 1:
                lc = run_llamacpp(gguf, reqs[c])
                if lc is not None:
                    row["llama.cpp"] = lc
            rows.append(row)
            print(f"C={c}: ours {ours['tok_s']:.1f} tok/s (TTFT p50 {ours['ttft_p50'] * 1e3:.0f} ms, "
                  f"TPOT p50 {ours['tpot_p50'] * 1e3:.0f} ms)"
                  + (f", transformers {row['transformers']['tok_s']:.1f} tok/s" if hf is not None else ""),
                  flush=True)
    finally:
        llm.shutdown()
    base = next((r["dist_engine"]["tok_s"] for r in rows if r["concurrency"] == 1), None)
    lines = ["| concurrent | requests | mean in flight | ours tok/s | vs our C=1 | TTFT p50 / p99 ms | "
             "TPOT p50 / p99 ms | transformers tok/s | ours vs transformers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["dist_engine"]
        t = r.get("transformers")
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {o['mean_in_flight']:.1f} | {o['tok_s']:.1f} | "
            f"{o['tok_s'] / base:.2f}x | "
            f"{o['ttft_p50'] * 1e3:.0f} / {o['ttft_p99'] * 1e3:.0f} | "
            f"{o['tpot_p50'] * 1e3:.0f} / {o['tpot_p99'] * 1e3:.0f} | "
            + (f"{t['tok_s']:.1f} | {o['tok_s'] / t['tok_s']:.2f}x |" if t else "| |"))
    on, off = prefix_ttft(path, tok, True), prefix_ttft(path, tok, False)
    cut = statistics.median(off[1:]) / statistics.median(on[1:])
    if base is not None and len(runs[levels[0]]) > 1:
        one = next(r["dist_engine"]["tok_s_per_round"] for r in rows if r["concurrency"] == 1)
        lines.append("\nPer round, vs C=1 of the same round: " + "; ".join(
            f"C={r['concurrency']} " + " / ".join(f"{x / b:.2f}x" for x, b in
                                                  zip(r["dist_engine"]["tok_s_per_round"], one))
            for r in rows if r["concurrency"] != 1))
    table = "\n".join(lines)
    prefix_line = (f"Shared ~500-token system prompt, 6 later requests: TTFT p50 "
                   f"{statistics.median(on[1:]) * 1e3:.0f} ms with prefix caching vs "
                   f"{statistics.median(off[1:]) * 1e3:.0f} ms without ({cut:.1f}x cut; goal >= 3x)")
    print(table)
    print(prefix_line)
    os.makedirs(RESULTS, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "dtype": "float32", "workload": "prompts ~20-130 tokens, outputs 16-64 tokens, T=0.8"}
    with open(os.path.join(RESULTS, "serving.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "prefix_ttft_on": on, "prefix_ttft_off": off,
                   "prefix_ttft_cut": cut}, f, indent=2)
    with open(os.path.join(RESULTS, "serving.md"), "w") as f:
        f.write(f"Default model, fp32, {meta['cpus']} CPUs, torch {meta['torch']}, {meta['date']}; "
                f"{meta['workload']}\n\n{table}\n\n{prefix_line}\n")


if __name__ == "__main__":
    main()
