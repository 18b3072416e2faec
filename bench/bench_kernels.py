"""What the C kernels (dist_engine/kernels) do for serving: C=1 and C=16 with them on and off.

    python bench/bench_kernels.py [--rounds 3]

One engine on the default model (fp32); the serving benchmark's workload (bench_serving.py:
mixed prompt and output lengths, T=0.8, a seed per request), closed loop at 1 and at 16
concurrent requests. "off" is the PyTorch path (padded K/V gather, PyTorch's fused attention)
and the numpy noise; "on" the decode attention kernel and the C noise. The two settings take
turns within every round (the order flips each round), so the machine's drift hits them alike.
Results go to bench/results/kernels.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from bench_serving import RESULTS, run_ours, workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    from transformers import AutoTokenizer

    import dist_engine.worker.sampler as sampler
    from dist_engine import LLM
    from dist_engine.kernels import gumbel
    from dist_engine.weights.registry import dequantized_folder

    path = dequantized_folder(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    reqs = {c: workload(tok, max(8, 4 * c), seed=0) for c in (1, 16)}
    llm = LLM(path, max_model_len=1024, speculative="none")
    runner = llm.engine.executor.worker.runner
    if not runner.use_paged_kernel or not gumbel._kernel():
        raise SystemExit("the C kernels are not built here (no compiler?): nothing to compare")

    def set_kernels(on: bool) -> None:
        runner.use_paged_kernel = on
        sampler.noise_rows = lambda keys, vocab: gumbel.noise_rows(keys, vocab, use_kernel=on)

    totals = {(on, c): [0, 0.0] for on in (True, False) for c in (1, 16)}
    rounds = []
    try:
        for r in range(a.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                set_kernels(on)
                rates = {}
                for c in (1, 16):
                    out = run_ours(llm, reqs[c], c)
                    totals[(on, c)][0] += out["tokens"]
                    totals[(on, c)][1] += out["seconds"]
                    rates[c] = out["tokens"] / out["seconds"]
                rounds.append({"round": r + 1, "kernels": on, "c1": rates[1], "c16": rates[16]})
                print(f"round {r + 1} kernels {'on' if on else 'off'}: C=1 {rates[1]:.1f}, "
                      f"C=16 {rates[16]:.1f} tok/s ({rates[16] / rates[1]:.2f}x)", flush=True)
    finally:
        set_kernels(True)
        llm.shutdown()
    rows = {}
    for on in (True, False):
        c1 = totals[(on, 1)][0] / totals[(on, 1)][1]
        c16 = totals[(on, 16)][0] / totals[(on, 16)][1]
        rows["on" if on else "off"] = {"c1": c1, "c16": c16, "ratio": c16 / c1}
    meta = {"cpus": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "rounds": a.rounds}
    with open(os.path.join(RESULTS, "kernels.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "rounds": rounds}, f, indent=1)
    lines = [f"Default model, fp32, {meta['cpus']} CPUs, torch {meta['torch']}, {meta['date']}; "
             f"serving workload, {a.rounds} rounds, settings alternating\n",
             "| C kernels | C=1 tok/s | C=16 tok/s | C=16 vs C=1 |", "|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['c1']:.1f} | {row['c16']:.1f} | {row['ratio']:.2f}x |")
    lines.append("\nPer round: " + "; ".join(
        f"{x['round']} {'on' if x['kernels'] else 'off'} {x['c16'] / x['c1']:.2f}x" for x in rounds))
    lines.append(f"\nC=16 with the kernels vs without: {rows['on']['c16'] / rows['off']['c16']:.2f}x; "
                 f"C=1: {rows['on']['c1'] / rows['off']['c1']:.2f}x")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "kernels.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
