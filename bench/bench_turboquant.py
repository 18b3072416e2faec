"""TurboQuant KV cache on the default model (SmolLM2-135M-Instruct, fp32 weights) at 8K context:
fp32, fp8, turboquant4 and turboquant3 caches side by side in one run.

    python bench/bench_turboquant.py [--context 8192] [--depths 0.05,0.25,0.5,0.75,0.95] [--keys 2]
        [--budget 32MiB] [--cpu-threads N]

1. Passkey retrieval: a 5-digit key hidden at each depth of a filler haystack ("The grass is
   green. The sky is blue. ..."), greedy answer of 8 tokens, scored by whether it holds the key.
   The summary counts the depths where the fp32 cache scores at least 90%. Prompts run one at a
   time, deepest needle first, with prefix caching, so each reuses the haystack before its
   needle from the previous one (codes are deterministic: a hit equals recomputation). No
   speculation (the default model's MTP graft would add a layer's cache and change the speed).
2. Perplexity on a fixed long text (Python's language reference, ``pydoc_data.topics``, in
   sorted order, cut at the context), every position attending the stored K/V of the ones
   before it.
3. Longest context for a fixed KV budget (``--budget``): the tokens each format's cache holds,
   checked through the engine's admission (one token more is refused), against a bf16 cache;
   admission is searched up to the model's longest context (8192), whatever ``--context`` is.
4. Decode tok/s at the full context: the passkey answers' inter-token latencies (median).

Results: bench/results/turboquant.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")
FORMATS = ("float32", "fp8_e4m3", "turboquant4", "turboquant3")
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8
CAPACITY_LEN = 8192  # the default model's longest context


def passkey_prompt(tok, context: int, depth: float, key: int) -> list[int]:
    """At most ``context`` - ANSWER_TOKENS tokens (within one filler sentence of it): the intro,
    filler sentences with the needle after ``depth`` of them, the question; tokenized as one
    text."""
    def text(n: int) -> str:
        before = round(n * depth)
        return INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n - before) + QUESTION

    n = context // len(tok.encode(FILLER))
    while len(tok.encode(text(n))) > context - ANSWER_TOKENS:
        n -= 1
    return tok.encode(text(n))


def long_text(tok, n: int) -> list[int]:
    from pydoc_data.topics import topics

    ids = tok.encode("\n\n".join(topics[k] for k in sorted(topics)))
    return ids[:n]


def perplexity(llm, ids: list[int]) -> float:
    from dist_engine import SamplingParams

    runner = llm.engine.executor.worker.runner
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        temperature=0, max_tokens=1, return_hidden_states=True))[0]
    hidden = out.outputs[0].hidden_states  # [N, H]
    target = torch.tensor(ids[1:])
    nll = 0.0
    for s in range(0, len(ids) - 1, 512):  # logits of 512 positions at a time
        logits = runner.model.compute_logits(hidden[s:min(s + 512, len(ids) - 1)])
        nll += torch.nn.functional.cross_entropy(logits.float(), target[s:s + logits.shape[0]],
                                                 reduction="sum").item()
    return float(torch.exp(torch.tensor(nll / (len(ids) - 1))))


def run_format(fmt: str, tok, args) -> dict:
    from dist_engine import LLM, SamplingParams

    rng = random.Random(1)
    prompts = [(d, rng.randrange(10000, 99999)) for d in sorted(args.depths, reverse=True)
               for _ in range(args.keys)]
    greedy = SamplingParams(temperature=0, max_tokens=ANSWER_TOKENS, ignore_eos=True)
    t0 = time.perf_counter()
    with LLM(kv_cache_dtype=fmt, max_model_len=args.context, max_num_seqs=1, cpu_threads=args.cpu_threads,
             kv_cache_memory=args.run_memory, speculative="none") as llm:
        per_depth: dict[float, list[bool]] = {}
        gaps = []
        for depth, key in prompts:
            ids = passkey_prompt(tok, args.context, depth, key)
            out = llm.generate(prompt_token_ids=[ids], sampling_params=greedy)[0]
            per_depth.setdefault(depth, []).append(str(key) in out.outputs[0].text)
            gaps.extend(out.metrics.inter_token_latencies)
            print(f"  {fmt} depth {depth:.2f} key {key}: {out.outputs[0].text!r}", flush=True)
        ppl = perplexity(llm, long_text(tok, args.context - 1))
        bytes_per_token = llm.engine.cache_info["bytes_per_block"] / llm.engine.cache_info["block_size"]
    decode = 1.0 / statistics.median(gaps)
    print(f"{fmt}: ppl {ppl:.3f}, decode {decode:.1f} tok/s, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"passkey": {f"{d:.2f}": sum(v) / len(v) for d, v in per_depth.items()},
            "perplexity": ppl, "decode_tok_s": decode, "bytes_per_token": bytes_per_token}


def longest_context(fmt: str, budget: int, hi: int) -> dict:
    """Tokens the cache of ``budget`` bytes holds, and the longest prompt admitted for one new
    token (binary search over the engine's admission check)."""
    from dist_engine import LLM, SamplingParams

    one = SamplingParams(temperature=0, max_tokens=1)
    with LLM(kv_cache_dtype=fmt, max_model_len=hi, kv_cache_memory=budget, skip_tokenizer_init=True,
             enable_prefix_caching=False, speculative="none") as llm:
        eng = llm.engine
        tokens = eng.blocks.num_blocks * eng.blocks.block_size
        lo, top = 1, hi - 1
        while lo < top:
            mid = (lo + top + 1) // 2
            try:
                eng.validate([1] * mid, one)
                lo = mid
            except ValueError:
                top = mid - 1
        return {"cache_tokens": tokens, "longest_prompt": lo,
                "bytes_per_token": eng.cache_info["bytes_per_block"] / eng.cache_info["block_size"]}


def commands(argv: list) -> str:
    """The command line(s) of a run, or of the side-by-side parts merged into it."""
    runs = argv if argv and isinstance(argv[0], list) else [argv]
    return "`; `".join("python bench/bench_turboquant.py " + " ".join(a) for a in runs)


def write(results: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "turboquant.json"), "w") as f:
        json.dump(results, f, indent=2)
    runs, cap = results["formats"], results["capacity"]
    good = [d for d, v in runs["float32"]["passkey"].items() if v >= 0.9]
    base = cap["bfloat16"]["cache_tokens"]
    lines = [f"# TurboQuant KV cache, default model, {results['context']}-token context",
             "", f"`{commands(results['argv'])}` ({results['date']}, "
             f"{results['machine']}, engine threads {results['cpu_threads'] or 'default'}); "
             f"passkey: {results['keys']} keys per depth; fp32 scores >= 90% at depths {', '.join(good) or 'none'}",
             "", "| cache | bytes/token | passkey at those depths | perplexity | decode tok/s (vs fp32) |",
             "|---|---|---|---|---|"]
    fp32_decode = runs["float32"]["decode_tok_s"]
    for fmt, r in runs.items():
        score = sum(r["passkey"][d] for d in good) / len(good) if good else float("nan")
        lines.append(f"| {fmt} | {r['bytes_per_token']:g} | {score:.2f} | {r['perplexity']:.3f} | "
                     f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / fp32_decode:.2f}x) |")
    lines += ["", "Passkey by depth:", "", "| cache | " + " | ".join(runs["float32"]["passkey"]) + " |",
              "|---|" + "---|" * len(runs["float32"]["passkey"])]
    for fmt, r in runs.items():
        lines.append(f"| {fmt} | " + " | ".join(f"{v:.2f}" for v in r["passkey"].values()) + " |")
    lines += ["", f"Longest context in a KV budget of {results['budget'] / 2**20:.0f} MiB (one rank):", "",
              "| cache | bytes/token | tokens held | longest prompt admitted | vs bf16 |", "|---|---|---|---|---|"]
    for fmt, c in cap.items():
        lines.append(f"| {fmt} | {c['bytes_per_token']:g} | {c['cache_tokens']} | {c['longest_prompt']} | "
                     f"{c['cache_tokens'] / base:.2f}x |")
    with open(os.path.join(RESULTS, "turboquant.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    from transformers import AutoTokenizer

    from dist_engine.config.sizes import parse_size
    from dist_engine.weights.registry import DEFAULT_MODEL, resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.05, 0.25, 0.5, 0.75, 0.95])
    ap.add_argument("--keys", type=int, default=2, help="passkeys per depth")
    ap.add_argument("--budget", type=lambda s: parse_size(s, "--budget"), default=parse_size("32MiB"),
                    help="KV budget of the longest-context comparison")
    ap.add_argument("--cpu-threads", type=int, default=None, help="the engine's CPU threads")
    ap.add_argument("--run-memory", default="1GiB", help="KV budget of the quality runs")
    ap.add_argument("--formats", type=lambda s: s.split(","), default=list(FORMATS))
    ap.add_argument("--part", choices=("all", "capacity", "quality"), default="all")
    ap.add_argument("--partial", help="write this run's JSON here (parts run side by side) instead")
    ap.add_argument("--combine", nargs="+", help="partial JSONs to merge into the results")
    args = ap.parse_args()
    if args.combine:
        parts = [json.load(open(path)) for path in args.combine]
        merged = {**parts[0], "argv": [p["argv"] for p in parts], "formats": {}, "capacity": {}}
        for key in ("formats", "capacity"):
            found = {fmt: r for p in parts for fmt, r in p[key].items()}
            merged[key] = {fmt: found[fmt] for fmt in ("bfloat16", *FORMATS) if fmt in found}
        return write(merged)
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs",
               "cpu_threads": args.cpu_threads, "depths": args.depths, "keys": args.keys,
               "context": args.context, "budget": args.budget, "argv": sys.argv[1:],
               "formats": {}, "capacity": {}}
    for fmt in ("bfloat16", *args.formats) if args.part != "quality" else ():
        results["capacity"][fmt] = longest_context(fmt, args.budget, CAPACITY_LEN)
        print(fmt, results["capacity"][fmt], flush=True)
    for fmt in args.formats if args.part != "capacity" else ():
        results["formats"][fmt] = run_format(fmt, tok, args)
    if args.partial:
        with open(args.partial, "w") as f:
            json.dump(results, f, indent=2)
    else:
        write(results)


if __name__ == "__main__":
    main()
