"""Acceptance of an MTP layer on held-out prompts (prompts graft-mtp never trains on).

    python bench/spec_acceptance.py [--graft DIR] [--prompts 100] [--k 3] [--max-tokens 96]
                                    [--modes greedy,t0.7,t0.7-unseeded] [--repetition-penalty R]

Drafts K tokens at every step (no adaptive depth, no draft budget, speculation kept on under
load), all prompts in one batch (acceptance does not depend on batching: each sequence's drafts
and verification are its own). Modes (``--modes``): greedy; ``t0.7``, T=0.7 with seed i for
prompt i (the shared-noise scheme: tokens identical to plain decoding); ``t0.7-unseeded``, T=0.7
without a seed (rejection sampling; seeds drawn from the engine's seed 0). Prints the mean
accepted length, per-position acceptance and wall time; ``--json`` appends a record.
``--repetition-penalty``: every request carries it (drafts are penalised like the target rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_engine import LLM, SamplingParams  # noqa: E402
from dist_engine.graft.prompts import split_prompts  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"


def measure(model: str, graft: str | None, prompts: list[str], k: int, max_tokens: int,
            dtype: str, modes: list[str], repetition_penalty: float = 1.0) -> dict:
    spec = {"method": "mtp", "num_speculative_tokens": k, "min_draft_acceptance": 0.0,
            "max_draft_tokens_per_step": 0, "disable_by_batch_size": 0}
    if graft:
        spec["model"] = graft
    res = {}
    with LLM(model, dtype=dtype, max_model_len=1024, max_num_seqs=len(prompts),
             speculative_config=spec) as llm:
        ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        for name in modes:
            params = [SamplingParams(temperature=0.0 if name == "greedy" else 0.7,
                                     seed=i if name == "t0.7" else None, max_tokens=max_tokens,
                                     repetition_penalty=repetition_penalty)
                      for i in range(len(ids))]
            before = llm.engine.spec_stats.as_dict()
            t = time.perf_counter()
            outs = llm.generate(prompt_token_ids=ids, sampling_params=params)
            after = llm.engine.spec_stats.as_dict()
            steps = after["num_steps"] - before["num_steps"]
            drafted = [a - b for a, b in zip(after["drafted_at"], before["drafted_at"] + [0] * k)]
            accepted = [a - b for a, b in zip(after["accepted_at"], before["accepted_at"] + [0] * k)]
            res[name] = {
                "mean_accepted_length": round(1 + sum(accepted) / max(steps, 1), 4),
                "per_position": [round(a / d, 4) if d else 0.0 for a, d in zip(accepted, drafted)],
                "steps": steps,
                "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                "seconds": round(time.perf_counter() - t, 1)}
            print(name, json.dumps(res[name]), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--graft", help="graft folder (default: the one shipped for the model)")
    ap.add_argument("--prompts", type=int, default=100, help="the first N held-out prompts")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--modes", default="greedy,t0.7,t0.7-unseeded")
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--json", help="append a record to this JSON-lines file")
    a = ap.parse_args()
    modes = a.modes.split(",")
    if not set(modes) <= {"greedy", "t0.7", "t0.7-unseeded"}:
        ap.error(f"unknown mode in {a.modes!r}")
    prompts = split_prompts()[1][: a.prompts]
    res = measure(a.model, a.graft, prompts, a.k, a.max_tokens, a.dtype, modes, a.repetition_penalty)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"graft": a.graft or "shipped", "prompts": len(prompts), "k": a.k,
                                "max_tokens": a.max_tokens, "dtype": a.dtype,
                                "repetition_penalty": a.repetition_penalty, **res}) + "\n")


if __name__ == "__main__":
    main()
