"""Simulated speed of the adaptive draft depth against fixed K (no model, seconds to run).

    python bench/sim_draft_depth.py [--cost 0.09]

Each step accepts the first j drafts with the given cumulative probabilities (the benchmark's
per-position acceptance, bench/results/spec.md) and costs 1 + cost x (drafts proposed), the
cost of a draft position as a share of a plain step (a chained MTP step plus a verified row,
~9% on CPU). Prints tokens per unit of cost for fixed K = 1..3 and for ``DraftDepth`` with its
defaults and with the earlier fast setting (alpha 0.1, probes every 16th step).
"""

from __future__ import annotations

import argparse
import random

from dist_engine.engine.draft_depth import DraftDepth

PROFILES = {"greedy": (0.59, 0.29, 0.20), "T=0.7": (0.43, 0.16, 0.07),
            "lower": (0.50, 0.22, 0.12), "low": (0.30, 0.08, 0.02)}


def speed(rates, cost: float, steps: int, fixed: int | None = None, **depth_kw) -> float:
    rng = random.Random(0)
    depth = DraftDepth(len(rates), 0.1, **depth_kw)
    tokens = spent = 0.0
    for _ in range(steps):
        n = fixed if fixed is not None else depth.limit()
        u = rng.random()
        accepted = min(n, sum(u < p for p in rates))
        tokens += 1 + accepted
        spent += 1 + cost * n
        depth.record(n, accepted)
    return tokens / spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cost", type=float, default=0.09)
    ap.add_argument("--steps", type=int, default=200_000)
    a = ap.parse_args()
    print("| acceptance | K=1 | K=2 | K=3 | adaptive (defaults) | adaptive (alpha 0.1, probe 16) |")
    print("|---|---|---|---|---|---|")
    for name, rates in PROFILES.items():
        fixed = [speed(rates, a.cost, a.steps, fixed=k) for k in (1, 2, 3)]
        new = speed(rates, a.cost, a.steps)
        old = speed(rates, a.cost, a.steps, alpha=0.1, probe_every=16)
        best = max(fixed)
        print(f"| {name} {'/'.join(f'{p:.0%}' for p in rates)} | "
              + " | ".join(f"{x:.3f}" for x in fixed)
              + f" | {new:.3f} ({new / best:.1%}) | {old:.3f} ({old / best:.1%}) |")


if __name__ == "__main__":
    main()
