"""Teacher-forced acceptance of an MTP graft, greedy and under rejection sampling, and short
fine-tunes of it with other losses (no engine run; minutes on 2 CPUs).

    python bench/graft_losses.py --work DIR [--graft DIR] [--limit 300] [--temperature 0.7]
                                 [--steps 600] [--lr 1e-4] [--losses base,tv,soft-t]

``--work``: the folder of a ``dist-engine graft-mtp`` run (its ``answers.jsonl`` and the
``teacher.pt`` cache of the base's hidden states). On the first ``--limit`` held-out answers,
per depth 1..3 with the preceding tokens given: how often the draft's argmax equals the base's
(what greedy verification accepts) and the expected rejection-sampling acceptance
sum_v min(p(v), q(v)) with both distributions tempered by ``--temperature`` and by 1 (p over the
full vocabulary, q over the draft vocabulary), plus the mean accepted length these imply at
K = 3. Then, for each of ``--losses``, ``--steps`` optimiser steps from the graft with that
loss and the same report: ``base`` the training loss of ``graft-mtp`` (the control: more steps
alone), ``tv`` plus the total variation between the tempered distributions, ``soft-t`` plus a
second soft term at the temperature. Results: docs/speculative.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_engine.config import ModelConfig  # noqa: E402
from dist_engine.graft.artifact import shipped_graft  # noqa: E402
from dist_engine.graft.data import load_answers, split_answers  # noqa: E402
from dist_engine.graft.model import GraftMTP  # noqa: E402
from dist_engine.graft.prompts import split_prompts  # noqa: E402
from dist_engine.graft.train import (  # noqa: E402
    Batches,
    answer_targets,
    base_head,
    base_probs,
    chained_logits,
    load_base,
    step_loss,
    teacher_pass,
)
from dist_engine.weights.registry import dequantized_folder  # noqa: E402
from dist_engine.worker.spec_decode import DRAFT_VOCAB_TENSOR, GRAFT_WEIGHTS  # noqa: E402

DEPTH = 3
WEIGHTS = (1.0, 0.5, 0.35)  # per depth, as graft-mtp weighs them


class Setup:
    """Answers split as graft-mtp splits them, the base's teacher signal, the graft's vocabulary."""

    def __init__(self, model: str, work: str, graft: str) -> None:
        from safetensors.torch import load_file

        path = dequantized_folder(model)
        recs = load_answers(os.path.join(work, "answers.jsonl"))
        (train, train_lens), (held, held_lens) = split_answers(recs, split_prompts()[1])
        self.cfg = ModelConfig.from_pretrained(path)
        base = load_base(path)
        self.embed = base["model.embed_tokens.weight"].float()
        self.full_head = base_head(path, base)
        teach = teacher_pass(path, train + held, os.path.join(work, "teacher.pt"), None, self.full_head)
        # score and learn answer tokens only, as graft-mtp does
        teach = answer_targets(teach, train_lens + held_lens)
        self.train = (train, teach[:len(train)])
        self.held = (held, teach[len(train):])
        self.weights = load_file(os.path.join(graft, GRAFT_WEIGHTS))
        self.vocab_ids = self.weights.pop(DRAFT_VOCAB_TENSOR).long()
        self.to_draft = torch.full((self.cfg.vocab_size,), -1, dtype=torch.long)
        self.to_draft[self.vocab_ids] = torch.arange(len(self.vocab_ids))
        self.head = self.full_head[self.vocab_ids]  # [V', H]
        self.max_len = max(map(len, train + held)) + DEPTH + 1

    def layer(self) -> GraftMTP:
        mtp = GraftMTP(self.cfg, self.max_len)
        mtp.load_exported(self.weights)
        return mtp


def report(s: Setup, mtp: GraftMTP, limit: int, temp: float) -> dict:
    """Per depth: greedy match rate and expected rejection acceptance at ``temp`` and at 1."""
    seqs, teach = s.held
    names = ("greedy", f"rejection T={temp}", "rejection T=1")
    sums = {n: [0.0] * DEPTH for n in names}
    total = [0] * DEPTH
    with torch.no_grad():
        for x, h, y in Batches(seqs[:limit], teach[:limit], 4, None):
            for d, logits in enumerate(chained_logits(mtp, s.embed, s.head, x, h, DEPTH), start=1):
                n = logits.shape[1]
                yd = y[:, d:d + n]
                valid = yd >= 0
                q_logits = logits[valid]  # [N, V']
                p_logits = h[:, d:d + n][valid] @ s.full_head.t()  # [N, V]: the base there
                sums["greedy"][d - 1] += float((s.vocab_ids[q_logits.argmax(-1)] == yd[valid]).sum())
                for name, t in ((names[1], temp), (names[2], 1.0)):
                    p = torch.softmax(p_logits / t, -1)[:, s.vocab_ids]
                    q = torch.softmax(q_logits / t, -1)
                    sums[name][d - 1] += float(torch.minimum(p, q).sum())
                total[d - 1] += int(valid.sum())
    out = {}
    for name, v in sums.items():
        rates = [a / max(1, t) for a, t in zip(v, total)]
        mal, run = 1.0, 1.0
        for r in rates:
            run *= r
            mal += run
        out[name] = {"per_depth": [round(r, 4) for r in rates], "mean_accepted_length": round(mal, 3)}
    return out


def finetune(s: Setup, loss: str, steps: int, lr: float, temp: float) -> GraftMTP:
    """``steps`` AdamW steps from the graft (warm-up, cosine decay) with the named loss."""
    mtp = s.layer()
    opt = torch.optim.AdamW(mtp.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    for i, (x, h, y) in enumerate(Batches(*s.train, 2, 1)):
        if i >= steps:
            break
        probs = base_probs(h, s.head)  # [B, L, V'] at T = 1
        with torch.no_grad():
            probs_t = torch.softmax((h @ s.head.t()) / temp, -1)
        total = torch.zeros(())
        for d, logits in enumerate(chained_logits(mtp, s.embed, s.head, x, h, DEPTH), start=1):
            term = step_loss(logits, probs, y, d, s.to_draft, "soft")
            if loss != "base":
                n = logits.shape[1]
                valid = y[:, d:d + n] >= 0
                lq = torch.log_softmax(logits[valid] / temp, -1)
                p = probs_t[:, d:d + n][valid]
                if loss == "tv":
                    term = term + (1 - torch.minimum(p, lq.exp()).sum(-1)).mean()
                else:  # soft-t
                    term = term - 0.5 * (p * lq).sum(-1).mean()
            total = total + WEIGHTS[d - 1] * term
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(mtp.parameters(), 1.0)
        opt.step()
        sched.step()
    return mtp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--work", required=True, help="a graft-mtp output folder (answers, teacher cache)")
    ap.add_argument("--graft", default=None, help="the graft to score (default: the shipped one)")
    ap.add_argument("--limit", type=int, default=300, help="held-out answers scored")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--losses", default="", help="comma-separated: base, tv, soft-t")
    a = ap.parse_args()
    losses = [x for x in a.losses.split(",") if x]
    unknown = set(losses) - {"base", "tv", "soft-t"}
    if unknown:
        raise SystemExit(f"--losses: unknown {sorted(unknown)}; choose from base, tv, soft-t")
    graft = a.graft or shipped_graft(a.model)
    if graft is None:
        raise SystemExit(f"no graft shipped for {a.model}: pass --graft DIR")
    s = Setup(a.model, a.work, graft)
    print("graft", json.dumps(report(s, s.layer(), a.limit, a.temperature)), flush=True)
    for loss in losses:
        t = time.time()
        mtp = finetune(s, loss, a.steps, a.lr, a.temperature)
        print(f"{loss} ({a.steps} steps, {time.time() - t:.0f} s)",
              json.dumps(report(s, mtp, a.limit, a.temperature)), flush=True)


if __name__ == "__main__":
    main()
