"""MTP speculative decoding on the default model: plain vs speculative, batch 1 and 16, one run.

    python bench/bench_spec.py [--tokens 128] [--ks 1,2,3] [--graft DIR] [--prompts 2] [--reps 3] [--name spec] [--fp32]

Our engines load the model as ``LLM(model)`` serves it (the default model: its shipped GGUF's
Q4_1 weights kept quantized); ``--fp32`` loads the dequantized fp32 folder instead, which
transformers always reads.

Batch 1: each held-out graft prompt (never trained on) plus one new prompt, chat template,
``--tokens`` new tokens (EOS ignored), greedy and temperature 0.7, without a seed (drafts verified
by rejection sampling, the default for unseeded requests) and seeded (the shared-noise scheme that
repeats plain seeded sampling token for token). Reports tok/s,
speed-up over plain decoding, mean accepted length and per-position acceptance for each K, and
where a speculative step's time goes. Batch 16: throughput of 16 concurrent requests (``--tokens`` / 2 each) plain,
with K=3 forced, and with the engine's defaults (requests admitted while more than 8 sequences
are in the engine run without speculation, the draft budget lowers K for large batches, the
adaptive depth drops draft positions that are rarely accepted). Batch-1 rows K=1..3 draft
K every step; "K=3 adaptive" uses the engine's defaults.
All configurations are loaded at once and take turns on every prompt (``--reps`` rounds), so
the machine's drifts in speed hit them alike.
transformers' batch-1 greedy takes its turn in the greedy rounds as the peer reference. Besides
the ratio of total tok/s, each speed-up is also given as the median over (round, prompt) of the
ratio to plain decoding on the same prompt in the same round, which a slow spell of the machine
barely moves. Writes JSON +
Markdown to bench/results/spec.*; compare ratios within one run (these machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")
EXTRA_PROMPT = "Write a haiku about GPUs and explain the imagery."


def chat_ids(tok, prompt: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_dict=True)
    return list(out["input_ids"])


def make_llms(path, ks, graft) -> dict:
    """One engine per configuration, all alive at once so that runs can alternate."""
    from dist_engine import LLM, SamplingParams

    base = {"method": "mtp", **({"model": graft} if graft else {})}
    fixed = {**base, "min_draft_acceptance": 0.0}  # K drafts every step (batch-1 rows)
    specs = {"plain": None, **{f"K={k}": {**fixed, "num_speculative_tokens": k} for k in ks},
             "K=3 adaptive": {**base, "num_speculative_tokens": 3},  # the engine's defaults
             "K=3 forced": {**fixed, "num_speculative_tokens": 3, "max_draft_tokens_per_step": 0}}
    llms = {}
    try:
        for name, spec in specs.items():
            llms[name] = LLM(path, max_model_len=1024, kv_cache_memory=256 << 20,
                             speculative="mtp" if spec else "none", speculative_config=spec)
            llms[name].generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=8))
    except BaseException:
        for llm in llms.values():
            llm.shutdown()
        raise
    return llms


# (row key, temperature, seeded): greedy; T=0.7 without a seed (rejection sampling); seeded
MODES = (("T=0.0", 0.0, True), ("T=0.7", 0.7, False), ("T=0.7 seeded", 0.7, True))


def batch1(llms: dict, prompts, n, modes, reps: int, hf=None) -> dict:
    """Per configuration and sampling mode: tok/s over all prompts and rounds (the configurations
    take turns on every prompt, so drifts of the machine's speed hit them alike), the median
    over (round, prompt) of the speed-up against plain decoding on that same prompt in that
    same round (robust to a slow spell of the machine), acceptance statistics and the seconds
    per speculative phase. ``hf``: a transformers model taking its turn in the greedy rounds."""
    from dist_engine import SamplingParams

    res = {name: {} for name in llms}
    for key, temp, seeded in modes:
        acc = {name: [0, 0.0] for name in llms}
        speed = {name: [] for name in llms}  # tok/s per (round, prompt)
        for llm in llms.values():
            llm.engine.spec_stats.__init__()
            depth = llm.engine.draft_depth
            if depth is not None:  # each mode learns its own adaptive depth
                depth.__init__(depth.k, depth.min_acceptance)
            dec = llm.engine.executor.worker.runner.drafter
            if dec is not None:
                dec.seconds = dict.fromkeys(dec.seconds, 0.0)
        peer = hf is not None and temp == 0.0
        if peer:
            acc["transformers"], speed["transformers"] = [0, 0.0], []
        for _ in range(reps):
            for i, ids in enumerate(prompts):
                for name, llm in llms.items():
                    sp = SamplingParams(temperature=temp, seed=i if seeded else None, max_tokens=n,
                                        ignore_eos=True)
                    t = time.perf_counter()
                    out = llm.generate(prompt_token_ids=[ids], sampling_params=sp)[0]
                    dt = time.perf_counter() - t
                    acc[name][1] += dt
                    acc[name][0] += len(out.outputs[0].token_ids)
                    speed[name].append(len(out.outputs[0].token_ids) / dt)
                if peer:
                    t = time.perf_counter()
                    transformers_generate(hf, ids, n)
                    dt = time.perf_counter() - t
                    acc["transformers"][1] += dt
                    acc["transformers"][0] += n
                    speed["transformers"].append(n / dt)
        for name in speed:
            median = statistics.median(x / p for x, p in zip(speed[name], speed["plain"]))
            entry = {"tok_s": acc[name][0] / acc[name][1], "median_paired_ratio": round(median, 3)}
            llm = llms.get(name)
            if llm is not None:
                st = llm.engine.spec_stats
                dec = llm.engine.executor.worker.runner.drafter
                entry.update({"mean_accepted_length": st.mean_accepted_length,
                              "per_position": [round(x, 3) for x in st.per_position],
                              "phase_seconds": {k: round(v, 2) for k, v in dec.seconds.items()} if dec else None})
            res.setdefault(name, {})[key] = entry
    return res


def batch16(llms: dict, prompts, n, reps: int) -> dict:
    """16 concurrent greedy requests of ``n`` tokens; configurations take turns each round.
    Each request starts with a token of its own (per round), so no configuration gets prefix
    hits from earlier runs: requests without speculation share blocks only among themselves."""
    from dist_engine import SamplingParams

    acc = {name: [0, 0.0] for name in llms}
    speed = {name: [] for name in llms}  # tok/s per round
    for r in range(reps):
        ids16 = [[1000 + 16 * r + i] + prompts[i % len(prompts)] for i in range(16)]
        for name, llm in llms.items():
            sps = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _ in ids16]
            t = time.perf_counter()
            outs = llm.generate(prompt_token_ids=ids16, sampling_params=sps)
            dt = time.perf_counter() - t
            acc[name][1] += dt
            acc[name][0] += sum(len(o.outputs[0].token_ids) for o in outs)
            speed[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    return {name: (tokens / secs, statistics.median(x / p for x, p in zip(speed[name], speed["plain"])))
            for name, (tokens, secs) in acc.items()}


def load_transformers(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    transformers_generate(model, [1, 2, 3], 4)
    return model


def transformers_generate(model, ids, n) -> None:
    with torch.inference_mode():
        model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--graft", default=None, help="graft folder (default: the shipped one)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--ks", default="1,2,3")
    ap.add_argument("--prompts", type=int, default=2, help="held-out prompts (plus one new)")
    ap.add_argument("--reps", type=int, default=3, help="rounds over the prompts")
    ap.add_argument("--name", default="spec", help="results file stem in bench/results/")
    ap.add_argument("--fp32", action="store_true", help="our engines on the dequantized fp32 folder")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from dist_engine.graft.prompts import split_prompts
    from dist_engine.weights.registry import dequantized_folder

    path = dequantized_folder(a.model)  # transformers' weights (and ours with --fp32)
    served = path if a.fp32 else a.model  # the name: LLM resolves it and finds its shipped graft
    tok = AutoTokenizer.from_pretrained(path)
    texts = split_prompts()[1][: a.prompts] + [EXTRA_PROMPT]
    prompts = [chat_ids(tok, p) for p in texts]
    llms = make_llms(served, [int(k) for k in a.ks.split(",")], a.graft)
    forced = llms.pop("K=3 forced")
    try:
        rows = batch1(llms, prompts, a.tokens, MODES, a.reps, hf=load_transformers(path))
        b16 = {k: llms[k] for k in ("plain", "K=3 adaptive") if k in llms}
        for name, (tok_s, ratio) in batch16({**b16, "K=3 forced": forced}, prompts, a.tokens // 2,
                                            2 * a.reps + 1).items():
            rows.setdefault(name, {}).update(batch16_tok_s=tok_s, batch16_median_paired_ratio=ratio)
    finally:
        for llm in [*llms.values(), forced]:
            llm.shutdown()
    hf = rows.pop("transformers")["T=0.0"]
    lines = ["| config | sampling | tok/s | vs plain | median paired ratio | mean accepted length | "
             "per-position acceptance |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        for key, _, _ in MODES:
            if key not in r:
                continue
            plain = rows["plain"][key]["tok_s"]
            spec = name != "plain"
            lines.append(f"| {name} | {key} | {r[key]['tok_s']:.1f} | {r[key]['tok_s'] / plain:.2f}x | "
                         f"{r[key]['median_paired_ratio']:.2f}x | {r[key]['mean_accepted_length']:.2f} | "
                         f"{'/'.join(f'{x:.0%}' for x in r[key]['per_position']) if spec else ''} |")
    best = max((n for n in rows if "T=0.0" in rows[n]), key=lambda n: rows[n]["T=0.0"]["tok_s"])
    b16 = ["| config (16 concurrent, greedy) | tok/s | vs plain | median paired ratio |", "|---|---|---|---|"]
    for name, r in rows.items():
        if "batch16_tok_s" in r:
            b16.append(f"| {name}{' (defaults: off above 8 sequences)' if name == 'K=3 adaptive' else ''} | {r['batch16_tok_s']:.1f} | "
                       f"{r['batch16_tok_s'] / rows['plain']['batch16_tok_s']:.2f}x | {r['batch16_median_paired_ratio']:.2f}x |")
    phases = ["| config | sampling | " + " | ".join(rows["K=3"]["T=0.0"]["phase_seconds"]) + " |",
              "|---|---|" + "---|" * len(rows["K=3"]["T=0.0"]["phase_seconds"])]
    for name, r in rows.items():
        for key, _, _ in MODES:
            ph = r.get(key, {}).get("phase_seconds")
            if ph:
                phases.append(f"| {name} | {key} | " + " | ".join(f"{v:.2f}" for v in ph.values()) + " |")
    text = ("\n".join(lines) + "\n\n\"median paired ratio\": the median over rounds and prompts of the "
            "speed-up against plain decoding on the same prompt in the same round. T=0.7: requests "
            "without a seed (drafts verified by rejection sampling); T=0.7 seeded: seed = prompt "
            "index (the shared-noise scheme, tokens identical to plain decoding).\n\n"
            f"transformers batch-1 greedy (the same weights dequantized to fp32, taking its turn in the greedy rounds): "
            f"{hf['tok_s']:.1f} tok/s, {hf['median_paired_ratio']:.2f}x plain (median paired); "
            f"best speculative greedy ({best}) vs transformers: {rows[best]['T=0.0']['tok_s'] / hf['tok_s']:.2f}x\n\n"
            + "\n".join(b16) + "\n\nSeconds per phase, summed over the batch-1 prompts:\n\n" + "\n".join(phases))
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    weights = ("fp32 (the dequantized folder)" if a.fp32 else
               "as served: the shipped GGUF's Q4_1 weights kept quantized, fp32 activations")
    meta = {"weights": weights, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "tokens": a.tokens, "prompts": texts, "batch": 1, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "transformers": hf}
    with open(os.path.join(RESULTS, f"{a.name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(os.path.join(RESULTS, f"{a.name}.md"), "w") as f:
        f.write(f"Default model ({a.model}, our weights {weights}; OMP_WAIT_POLICY={meta['omp_wait_policy'] or 'unset'}), {a.tokens} tokens, {len(prompts)} prompts x {a.reps} rounds, "
                f"{meta['cpus']} CPUs, torch {meta['torch']}, {meta['date']}\n\n{text}\n")


if __name__ == "__main__":
    main()
