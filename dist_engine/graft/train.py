"""``dist-engine graft-mtp``: fit an MTP layer to a frozen base model by self-distillation.

1. Data: the base model's own answers to the prompt set (``data.py``; our batched engine).
2. Teacher signal (once, cached): for every position p the base's final-norm hidden state
   h[p] and its greedy prediction y[p] of token p + 1, as our engine computed them while
   generating the answers, or from a prefill of them.
3. Training, chained through ``depth`` steps as the engine runs them: step 1 reads (h[p],
   x[p+1]) and must predict y[p+1]; step d reads step d-1's (normed) output and x[p+d] and must
   predict y[p+d]. Cross-entropy over the draft vocabulary (the most frequent predicted ids);
   the base stays frozen, the embedding and head are the base's.
4. Report on held-out answers: teacher-forced top-1 accuracy per depth, against the untrained
   layer and a repeat-the-last-token baseline; checkpoints after every epoch (resumable).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dist_engine.config import ModelConfig
from dist_engine.graft.artifact import GRAFT_CONFIG, base_fingerprint, read_graft_for
from dist_engine.graft.model import GraftMTP
from dist_engine.quant.checkpoint import checkpoint_quantization
from dist_engine.quant.lazy import QuantTensor
from dist_engine.weights.loader import checkpoint_files, iter_checkpoint
from dist_engine.worker.spec_decode import DRAFT_VOCAB_TENSOR, GRAFT_WEIGHTS

log = logging.getLogger(__name__)


def teacher_pass(model_path: str, seqs: list[list[int]], cache_file: str | None = None,
                 hidden_dir: str | None = None, head: torch.Tensor | None = None,
                 device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: (hidden ``[L, H]`` after the final norm, greedy predictions ``[L]``);
    kept in ``cache_file``, so a repeated run, or one on more answers, only computes the
    sequences the cache does not hold. Predictions come from ``head`` ``[vocab, H]`` (default:
    the base's). Hidden states the engine returned while generating (``hidden_dir``, see
    ``data.generate_answers``) are used as they are; they lack the last position, which gets no
    target (-1). What is left is prefilled by our engine, which returns every position's hidden
    state (``return_hidden_states``)."""
    from dist_engine import LLM, SamplingParams
    from dist_engine.graft.data import load_hidden

    if head is None:
        head = base_head(model_path)

    known: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    if cache_file and os.path.isfile(cache_file):
        cached = torch.load(cache_file, weights_only=True)
        known = {tuple(s): (h, y) for s, h, y in zip(cached["seqs"], cached["hidden"], cached["pred"])}
    missing = [s for s in seqs if tuple(s) not in known]
    engine_rows = load_hidden(hidden_dir) if missing else {}
    for s in missing:
        h = engine_rows.get(tuple(s))
        if h is not None and len(h) == len(s) - 1:
            y = torch.cat([(h @ head.t()).argmax(-1), torch.tensor([-1])])
            known[tuple(s)] = (torch.cat([h, h.new_zeros(1, h.shape[-1])]), y)
    todo = [s for s in missing if tuple(s) not in known]
    if todo:  # each sequence as a prompt: its whole prefill's rows, [L, H]
        params = SamplingParams(temperature=0, max_tokens=1, return_hidden_states=True)
        with LLM(model_path, dtype="float32", device=device, skip_tokenizer_init=True, max_num_seqs=16,
                 speculative="none",
                 max_num_batched_tokens=2048, max_model_len=max(map(len, todo)) + 1) as llm:
            outs = llm.generate(prompt_token_ids=todo, sampling_params=params, use_tqdm=True)
        for s, o in zip(todo, outs):
            h = o.outputs[0].hidden_states.float().cpu()
            known[tuple(s)] = (h, (h @ head.t()).argmax(-1))
    out = [known[tuple(s)] for s in seqs]
    if cache_file and missing:
        torch.save({"seqs": seqs, "hidden": [h for h, _ in out], "pred": [y for _, y in out]},
                   cache_file)
    return out


def answer_targets(teach, prompt_lens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher signal with the prompt's targets dropped (-1), so that only predictions of
    answer tokens are learnt and scored: y[q] predicts token q + 1, kept where q + 1 >= the
    prompt length."""
    return [(h, y.clone().index_fill_(0, torch.arange(max(0, n - 1)), -1))
            for (h, y), n in zip(teach, prompt_lens)]


def load_base(model_path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the base checkpoint (weights kept quantized dequantized to fp32)."""
    if all(f.endswith(".safetensors") for f in checkpoint_files(model_path)) and \
            checkpoint_quantization(model_path) is None:
        base = {}
        for f in checkpoint_files(model_path):
            base.update(load_file(f))
        return base
    return {name: t[:].dequantize() if isinstance(t, QuantTensor) else t[:]
            for name, t in iter_checkpoint(model_path)}


def base_head(model_path: str, base: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The base's lm head ``[vocab, H]`` in fp32 (the embedding when they are tied)."""
    base = base if base is not None else load_base(model_path)
    return base.get("lm_head.weight", base["model.embed_tokens.weight"]).float()


class Batches:
    """Right-padded batches of (tokens, hidden, predictions), similar lengths together."""

    def __init__(self, seqs, teach, batch_size: int, shuffle_seed: int | None,
                 device: torch.device | str = "cpu") -> None:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        self.groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if shuffle_seed is not None:
            g = torch.Generator().manual_seed(shuffle_seed)
            self.groups = [self.groups[i] for i in torch.randperm(len(self.groups), generator=g)]
        self.seqs, self.teach, self.device = seqs, teach, device

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        for idx in self.groups:
            L = max(len(self.seqs[i]) for i in idx)
            x = torch.zeros(len(idx), L, dtype=torch.long)
            y = torch.full((len(idx), L), -1, dtype=torch.long)
            h = torch.zeros(len(idx), L, self.teach[idx[0]][0].shape[-1])
            for b, i in enumerate(idx):
                n = len(self.seqs[i])
                x[b, :n] = torch.tensor(self.seqs[i])
                h[b, :n], y[b, :n] = self.teach[i]
            yield x.to(self.device), h.to(self.device), y.to(self.device)


def chained_logits(mtp: GraftMTP, embed: torch.Tensor, head: torch.Tensor, x, h, depth: int,
                   feedback: str = "normed"):
    """Draft logits ``[B, L - d, V']`` for depths d = 1..depth (element t of depth d sits at
    position t + d - 1 and predicts the base's token after t + d). ``feedback``: what step d
    passes to step d + 1, the output after ``shared_head.norm`` or the raw one."""
    B, L = x.shape
    out = []
    feed = h[:, : L - 1]
    context: list = []
    for d in range(1, depth + 1):
        n = L - d
        if n <= 0:
            break
        pos = torch.arange(d - 1, d - 1 + n).expand(B, n)
        g, kv = mtp(F.embedding(x[:, d:d + n], embed), feed[:, :n], pos, context)
        context.append(kv)
        normed = mtp.shared_head_norm(g)
        out.append(normed @ head.t())  # [B, n, V']
        feed = normed if feedback == "normed" else g
    return out


def evaluate(mtp, embed, head, remap, batches, depth: int, feedback: str = "normed") -> dict:
    """Teacher-forced top-1 accuracy per depth on the answers (predictions in the draft vocab)."""
    hits = [0] * depth
    total = [0] * depth
    repeat_hits = total_repeat = 0
    with torch.no_grad():
        for x, h, y in batches:
            for d, logits in enumerate(chained_logits(mtp, embed, head, x, h, depth, feedback), start=1):
                tgt = y[:, d:d + logits.shape[1]]
                valid = tgt >= 0
                pred = remap[logits.argmax(-1)]
                hits[d - 1] += int(((pred == tgt) & valid).sum())
                total[d - 1] += int(valid.sum())
            valid = y[:, 1:] >= 0
            repeat_hits += int(((x[:, 1:] == y[:, 1:]) & valid).sum())
            total_repeat += int(valid.sum())
    acc = [hh / max(1, t) for hh, t in zip(hits, total)]
    expected, run = 1.0, 1.0
    for a in acc:
        run *= a
        expected += run
    return {"accuracy_per_depth": [round(a, 4) for a in acc],
            "repeat_last_token_accuracy": round(repeat_hits / max(1, total_repeat), 4),
            "estimated_mean_accepted_length": round(expected, 3)}


def base_probs(h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """The base's distribution over the draft vocabulary at every position ``[B, L, V']``, from
    its cached final-norm hidden states (computed once per batch, shared by all depths)."""
    with torch.no_grad():
        return torch.softmax(h @ head.t(), dim=-1)


def step_loss(logits, probs, y, d: int, to_draft, targets: str) -> torch.Tensor:
    """Loss of depth ``d``'s draft logits ``[B, n, V']``: element t predicts the base's token
    after position t + d; ``probs`` (:func:`base_probs`, ``soft`` only) holds the base's whole
    distribution there."""
    n = logits.shape[1]
    yd = y[:, d:d + n]
    valid = yd >= 0  # [B, n]
    lp = torch.log_softmax(logits[valid], dim=-1)  # [N, V']
    tgt = to_draft[yd[valid]]
    hard = F.nll_loss(lp, tgt.clamp(min=0), reduction="none").masked_fill(tgt < 0, 0.0).mean()
    if targets == "hard":
        return hard
    return 0.5 * hard - 0.5 * (probs[:, d:d + n][valid] * lp).sum(-1).mean()


def graft(model_path: str, train_seqs: list[list[int]], held_seqs: list[list[int]], out_dir: str,
          *, epochs: int = 4, depth: int = 3, lr: float = 2e-3, batch_size: int = 8,
          draft_vocab_size: int = 8192, seed: int = 0, dtype: str = "bfloat16",
          targets: str = "soft", feedback: str = "normed", init_from: str | None = None,
          prompt_lens: list[int] | None = None, hidden_dir: str | None = None,
          extra_meta: dict | None = None, device: str = "cpu", time_budget_s: float | None = None) -> dict:
    """``prompt_lens`` (train then held-out order): learn and score only predictions of answer
    tokens, where drafts are used (a chat template's fixed system prompt would otherwise be
    memorised and inflate the score). ``targets``: ``hard`` = cross-entropy against the base's
    greedy token; ``soft`` = against the base's whole distribution over the draft vocabulary
    (its logits come free from the cached hidden states) plus the hard term. ``init_from``: a
    graft folder for the same base to start from (e.g. to continue on more answers) instead of
    the copy of the base's last layer. ``hidden_dir``: the base's hidden states saved while
    generating the answers (:func:`teacher_pass` computes only the rest). ``feedback``: what a
    chained step feeds the next (``SpeculativeConfig.feedback``; recorded in the graft).
    ``device``: where the teacher pass and the training run (``cuda`` for a large base).
    ``time_budget_s``: stop training after this many seconds (evaluation excluded), the
    learning rate decaying over the budget (equal-time comparisons with ``graft-dflash``)."""
    if targets not in ("soft", "hard"):
        raise ValueError(f"targets must be 'soft' or 'hard', not {targets!r}")
    if feedback not in ("normed", "raw"):
        raise ValueError(f"feedback must be 'normed' or 'raw', not {feedback!r}")
    cfg = ModelConfig.from_pretrained(model_path)
    if cfg.qk_norm:
        raise ValueError("grafting supports Llama/Mistral/Qwen2-style blocks (no q/k norm)")
    fingerprint = base_fingerprint(model_path)
    # a graft to start from is checked before the (long) teacher pass
    start = read_graft_for(init_from, model_path, fingerprint) if init_from is not None else None
    if start is not None and start.get("feedback", "normed") != feedback:
        raise ValueError(f"{init_from} chains its steps with feedback={start.get('feedback')!r}; "
                         f"continue it with that feedback, or start a new graft without --init")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    base = load_base(model_path)
    embed = base["model.embed_tokens.weight"].float()
    full_head = base_head(model_path, base)
    teach = teacher_pass(model_path, train_seqs + held_seqs, os.path.join(out_dir, "teacher.pt"),
                         hidden_dir, full_head, device)
    if prompt_lens is not None:
        teach = answer_targets(teach, prompt_lens)
    t_train, t_held = teach[:len(train_seqs)], teach[len(train_seqs):]
    counts = torch.bincount(torch.cat([y[y >= 0] for _, y in t_train]), minlength=cfg.vocab_size)
    vocab_ids = torch.argsort(counts, descending=True, stable=True)[:draft_vocab_size]
    coverage = float(counts[vocab_ids].sum() / counts.sum())
    to_draft = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
    to_draft[vocab_ids] = torch.arange(len(vocab_ids))
    dev = torch.device(device)
    embed, head = embed.to(dev), full_head[vocab_ids].to(dev)  # head [V', H]
    remap, to_draft = vocab_ids.to(dev), to_draft.to(dev)  # draft index -> token id, and back
    max_len = max(len(s) for s in train_seqs + held_seqs) + depth + 1
    mtp = GraftMTP(cfg, max_len)
    mtp.init_from_base(base)
    mtp.to(dev)
    held = Batches(held_seqs, t_held, batch_size, None, dev)
    report = {"untrained": evaluate(mtp, embed, head, remap, held, depth, feedback)}
    if init_from is not None:
        mtp.load_exported(load_file(os.path.join(init_from, GRAFT_WEIGHTS)))
        report["initial"] = evaluate(mtp, embed, head, remap, held, depth, feedback)
    # a fixed slice of the training answers, scored like the held-out ones: the gap shows
    # whether more answers (over-fitting) or a larger layer (under-fitting) would help
    every = max(1, len(train_seqs) // max(1, len(held_seqs)))
    seen = Batches(train_seqs[::every][:len(held_seqs)], t_train[::every][:len(held_seqs)],
                   batch_size, None, dev)
    opt = torch.optim.AdamW(mtp.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * len(Batches(train_seqs, t_train, batch_size, None))
    clock = {"trained": 0.0}  # seconds spent in optimiser steps

    def progress(i: int) -> float:
        return min(1.0, max(i / steps, clock["trained"] / time_budget_s if time_budget_s else 0.0))

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress(i))))
    ckpt = os.path.join(out_dir, "graft_checkpoint.pt")
    start_epoch = 0
    if os.path.isfile(ckpt):
        state = torch.load(ckpt, weights_only=False, map_location=dev)
        mtp.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch = state["epoch"]
        report = state["report"]
        clock["trained"] = state.get("seconds", 0.0)
        log.info("resuming from %s after epoch %d", ckpt, start_epoch)
    weights = [1.0, 0.5, 0.35, 0.25][:depth] + [0.25] * max(0, depth - 4)
    t0 = time.time()
    for epoch in range(start_epoch, epochs):
        if time_budget_s is not None and clock["trained"] >= time_budget_s:
            break
        bar = tqdm(Batches(train_seqs, t_train, batch_size, seed + epoch, dev),
                   desc=f"epoch {epoch + 1}/{epochs}")
        for x, h, y in bar:
            t_step = time.perf_counter()
            loss = torch.zeros(())
            probs = base_probs(h, head) if targets == "soft" else None
            for d, logits in enumerate(chained_logits(mtp, embed, head, x, h, depth, feedback), start=1):
                loss = loss + weights[d - 1] * step_loss(logits, probs, y, d, to_draft, targets)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mtp.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            clock["trained"] += time.perf_counter() - t_step
            if time_budget_s is not None and clock["trained"] >= time_budget_s:
                break
        report[f"epoch_{epoch + 1}"] = evaluate(mtp, embed, head, remap, held, depth, feedback)
        report[f"epoch_{epoch + 1}"]["train_subset_accuracy_per_depth"] = evaluate(
            mtp, embed, head, remap, seen, depth, feedback)["accuracy_per_depth"]
        log.info("epoch %d held-out: %s", epoch + 1, report[f"epoch_{epoch + 1}"])
        report[f"epoch_{epoch + 1}"]["train_seconds"] = round(clock["trained"], 1)
        torch.save({"model": mtp.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch + 1, "report": report, "seconds": clock["trained"]}, ckpt)
    tensors = {k: v.cpu() for k, v in mtp.export(getattr(torch, dtype)).items()}
    tensors[DRAFT_VOCAB_TENSOR] = vocab_ids.contiguous()
    save_file(tensors, os.path.join(out_dir, GRAFT_WEIGHTS))
    meta = {
        "base_model": os.path.basename(os.path.normpath(model_path)),
        "base_fingerprint": fingerprint,
        "concat_order": "emb_hidden", "hidden_stage": "normed", "feedback": feedback,
        "num_nextn_predict_layers": 1, "draft_vocab_size": len(vocab_ids),
        "draft_vocab_coverage": round(coverage, 4),
        "training": {"epochs": epochs, "depth": depth, "lr": lr, "batch_size": batch_size,
                     "train_sequences": len(train_seqs), "train_tokens": sum(map(len, train_seqs)),
                     "held_out_sequences": len(held_seqs), "seconds": round(time.time() - t0, 1),
                     "train_seconds": round(clock["trained"], 1), "time_budget_s": time_budget_s,
                     "targets": ("soft + hard (base distribution over the draft vocabulary and "
                                 "its greedy token)" if targets == "soft" else
                                 "hard (base greedy predictions)"),
                     "scored_positions": "answer tokens" if prompt_lens else "all",
                     "initialised_from": (start["training"] if start
                                          else "the base's last decoder layer"),
                     **(extra_meta or {})},
        "held_out": report,
    }
    with open(os.path.join(out_dir, GRAFT_CONFIG), "w") as f:
        json.dump(meta, f, indent=2)
    return meta
