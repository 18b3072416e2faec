"""DFlash drafter vs MTP grafts on the default model: held-out acceptance and batch-1 speed-up.

    python bench/bench_dflash.py --dflash DIR --mtp DIR [--prompts 40] [--speed-prompts 3]
                                 [--tokens 96] [--reps 2] [--name dflash]

Configurations: plain decoding; the shipped MTP graft (K=3); an MTP graft and a DFlash drafter
trained from scratch on the same answers for the same time (``graft-mtp`` / ``graft-dflash
--time-budget``), the MTP graft at K=3 and the DFlash drafter at K=3 and K=B-1 (its whole
block). Held-out prompts: the graft prompts from index ``--skip`` on that the split holds out
(none of them trained on by any of these drafters, none tuned on).

1. Acceptance: all ``--prompts`` prompts in one batch, K drafts every step (no adaptive depth,
   no draft budget), greedy and T=0.7 seeded (seed = prompt index; the shared-noise scheme);
   mean accepted length and per-position acceptance from the engine's stats.
2. Speed at batch 1: ``--speed-prompts`` prompts, ``--tokens`` tokens (EOS ignored), greedy and
   T=0.7 seeded; all engines loaded at once take turns on every prompt (``--reps`` rounds);
   tok/s, the ratio to plain, and the median over (round, prompt) of the paired ratio.

Writes bench/results/NAME.json and .md; compare ratios within one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_engine import LLM, SamplingParams  # noqa: E402
from dist_engine.config.dflash import DFlashConfig  # noqa: E402
from dist_engine.graft.prompts import graft_prompts  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODEL = "smollm2-135m-instruct"
MODES = (("greedy", 0.0), ("T=0.7 seeded", 0.7))


def held_out(skip: int, n: int) -> list[str]:
    """Held-out prompts (every 10th of the set) from index ``skip`` on."""
    return [p for i, p in enumerate(graft_prompts()) if i % 10 == 9 and i >= skip][:n]


def configs(a) -> dict[str, dict | None]:
    block = DFlashConfig.from_pretrained(a.dflash).block_size
    fixed = {"min_draft_acceptance": 0.0, "max_draft_tokens_per_step": 0, "disable_by_batch_size": 0}
    return {"plain": None,
            "MTP shipped K=3": {"method": "mtp", "num_speculative_tokens": 3, **fixed},
            "MTP equal-time K=3": {"method": "mtp", "model": a.mtp, "num_speculative_tokens": 3, **fixed},
            "DFlash equal-time K=3": {"method": "dflash", "model": a.dflash, "num_speculative_tokens": 3, **fixed},
            f"DFlash equal-time K={block - 1}": {"method": "dflash", "model": a.dflash,
                                                 "num_speculative_tokens": block - 1, **fixed}}


def window(llm, ids, params):
    """Generate; the engine's speculative counters over that run."""
    before = llm.engine.spec_stats.as_dict()
    out = llm.generate(prompt_token_ids=ids, sampling_params=params)
    after = llm.engine.spec_stats.as_dict()
    steps = after["num_steps"] - before["num_steps"]
    k = len(after["drafted_at"])
    drafted = [x - y for x, y in zip(after["drafted_at"], before["drafted_at"] + [0] * k)]
    accepted = [x - y for x, y in zip(after["accepted_at"], before["accepted_at"] + [0] * k)]
    return out, {"mean_accepted_length": round(1 + sum(accepted) / max(1, steps), 3),
                 "per_position": [round(x / d, 3) if d else 0.0 for x, d in zip(accepted, drafted)]}


def acceptance(llms: dict, ids: list[list[int]], tokens: int) -> dict:
    res = {}
    for name, llm in llms.items():
        if name == "plain":
            continue
        for mode, temp in MODES:
            params = [SamplingParams(temperature=temp, seed=i, max_tokens=tokens) for i in range(len(ids))]
            _, st = window(llm, ids, params)
            res.setdefault(name, {})[mode] = st
            print("acceptance", name, mode, st, flush=True)
    return res


def speed(llms: dict, ids: list[list[int]], tokens: int, reps: int) -> dict:
    res = {}
    for mode, temp in MODES:
        acc = {name: [0, 0.0] for name in llms}
        per = {name: [] for name in llms}
        for _ in range(reps):
            for i, p in enumerate(ids):
                for name, llm in llms.items():
                    sp = SamplingParams(temperature=temp, seed=i, max_tokens=tokens, ignore_eos=True)
                    t = time.perf_counter()
                    out = llm.generate(prompt_token_ids=[p], sampling_params=sp)[0]
                    dt = time.perf_counter() - t
                    n = len(out.outputs[0].token_ids)
                    acc[name][0] += n
                    acc[name][1] += dt
                    per[name].append(n / dt)
        for name in llms:
            tok_s = acc[name][0] / acc[name][1]
            res.setdefault(name, {})[mode] = {
                "tok_s": round(tok_s, 2),
                "vs_plain": round(tok_s / (acc["plain"][0] / acc["plain"][1]), 3),
                "median_paired_ratio": round(statistics.median(x / y for x, y in zip(per[name], per["plain"])), 3)}
            print("speed", name, mode, res[name][mode], flush=True)
    return res


def markdown(meta: dict, acc: dict, spd: dict) -> str:
    lines = [f"Default model ({MODEL}, fp32), {meta['machine']}, {meta['date']}; the machine was shared "
             "with other jobs: compare ratios within this run only.", "",
             f"Acceptance: {meta['prompts']} held-out prompts (graft prompts >= {meta['skip']}), up to "
             f"{meta['tokens']} tokens, one batch, K drafts every step.", "",
             "| drafter | greedy: mean accepted length | per position | T=0.7 seeded: mean accepted length | per position |",
             "|---|---|---|---|---|"]
    for name, r in acc.items():
        g, t = r["greedy"], r["T=0.7 seeded"]
        lines.append(f"| {name} | {g['mean_accepted_length']:.3f} | {'/'.join(f'{x:.0%}' for x in g['per_position'])} "
                     f"| {t['mean_accepted_length']:.3f} | {'/'.join(f'{x:.0%}' for x in t['per_position'])} |")
    lines += ["", f"Speed at batch 1: {meta['speed_prompts']} prompts x {meta['reps']} rounds, "
              f"{meta['speed_tokens']} tokens each (EOS ignored), engines taking turns.", "",
              "| config | greedy tok/s | vs plain | median paired | T=0.7 seeded tok/s | vs plain | median paired |",
              "|---|---|---|---|---|---|---|"]
    for name, r in spd.items():
        g, t = r["greedy"], r["T=0.7 seeded"]
        lines.append(f"| {name} | {g['tok_s']:.1f} | {g['vs_plain']:.2f}x | {g['median_paired_ratio']:.2f}x "
                     f"| {t['tok_s']:.1f} | {t['vs_plain']:.2f}x | {t['median_paired_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dflash", required=True, help="a graft-dflash output folder")
    ap.add_argument("--mtp", required=True, help="a graft-mtp output folder (trained for the same time)")
    ap.add_argument("--skip", type=int, default=800, help="held-out prompts from this index on")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--speed-prompts", type=int, default=3)
    ap.add_argument("--speed-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--name", default="dflash")
    a = ap.parse_args()
    prompts = held_out(a.skip, a.prompts)
    llms = {}
    try:
        for name, spec in configs(a).items():
            llms[name] = LLM(MODEL, max_model_len=1024, max_num_seqs=max(16, a.prompts),
                             speculative="none" if spec is None else spec["method"], speculative_config=spec)
            llms[name].generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=8))  # warm-up
        ids = [llms["plain"].apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        acc = acceptance(llms, ids, a.tokens)
        spd = speed(llms, ids[:a.speed_prompts], a.speed_tokens, a.reps)
    finally:
        for llm in llms.values():
            llm.shutdown()
    meta = {"model": MODEL, "dflash": a.dflash, "mtp": a.mtp, "skip": a.skip, "prompts": len(prompts),
            "tokens": a.tokens, "speed_prompts": a.speed_prompts, "speed_tokens": a.speed_tokens, "reps": a.reps,
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {platform.machine()}",
            "date": time.strftime("%Y-%m-%d")}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{a.name}.json"), "w") as f:
        json.dump({"meta": meta, "acceptance": acc, "speed": spd}, f, indent=2)
    text = markdown(meta, acc, spd)
    with open(os.path.join(RESULTS, f"{a.name}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
