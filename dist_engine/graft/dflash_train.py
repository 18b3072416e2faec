"""``dist-engine graft-dflash``: train a DFlash block drafter for a frozen base model from its
own answers (the MTP graft's data pipeline: prompts, answers, held-out split).

1. Teacher signal per answer: the outputs of the drafter's ``target_layer_ids`` layers at every
   position (its context features) and the base's greedy prediction there, as the engine
   returned them while generating the answers (``generate_answers(layers=...)``), or from an
   engine prefill of the answers that lack them.
2. Block objective (the DFlash paper's): random anchor positions ``a`` in each answer; the
   drafter sees the context features of positions ``< a`` as K/V and one non-causal block
   ``[x[a], mask, ..., mask]``, and slot ``k`` must predict the base's token at ``a + k`` (its
   greedy prediction after ``x[:a + k]``). Cross-entropy over the full vocabulary through the
   base's head, slot ``k`` weighted ``exp(-(k - 1) / gamma)``: early slots matter most, since
   a draft counts only when every one before it was accepted.
3. Report on held-out answers after every epoch: per-slot accuracy and the expected acceptance
   length for K = 1..B-1 drafts (1 + the mean run of leading correct slots), against the
   initialised drafter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from dist_engine.config import ModelConfig
from dist_engine.graft.artifact import base_fingerprint
from dist_engine.graft.dflash_model import DFLASH_WEIGHTS, GraftDFlash, default_target_layers
from dist_engine.graft.train import base_head, load_base

log = logging.getLogger(__name__)
REPORT = "dflash_report.json"


def dflash_teacher(model_path: str, seqs: list[list[int]], layers: list[int], head: torch.Tensor,
                   hidden_dir: str | None = None, device: str = "cpu"
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence of L tokens: (``layers``' outputs ``[L, len(layers) * H]`` fp16, the base's
    greedy predictions ``[L]``, -1 where none). Rows the engine saved while generating are used
    as they are (they lack the last position, never fed); the rest are prefilled by the engine."""
    from dist_engine import LLM, SamplingParams
    from dist_engine.graft.data import load_features

    saved = load_features(hidden_dir, layers)
    known = {}
    for s in seqs:
        h, f = saved.get(tuple(s), (None, None))
        if f is not None and len(f) == len(h) == len(s) - 1:
            y = torch.cat([(h @ head.t()).argmax(-1), torch.tensor([-1])])
            known[tuple(s)] = (torch.cat([f, f.new_zeros(1, f.shape[-1])]), y)
    todo = [s for s in seqs if tuple(s) not in known]
    if todo:  # each sequence as a prompt: its whole prefill's rows [L, H * (1 + len(layers))]
        H = head.shape[1]
        params = SamplingParams(temperature=0, max_tokens=1, return_hidden_states=True)
        with LLM(model_path, dtype="float32", device=device, skip_tokenizer_init=True, max_num_seqs=16,
                 speculative="none", hidden_state_layers=tuple(layers), max_num_batched_tokens=2048,
                 max_model_len=max(map(len, todo)) + 1) as llm:
            outs = llm.generate(prompt_token_ids=todo, sampling_params=params, use_tqdm=len(todo) > 64)
        for s, o in zip(todo, outs):
            rows = o.outputs[0].hidden_states.float().cpu()
            known[tuple(s)] = (rows[:, H:].half(), (rows[:, :H] @ head.t()).argmax(-1))
    return [known[tuple(s)] for s in seqs]


class Blocks:
    """Right-padded batches of answers with their anchors: ``x`` ``[N, L]``, features
    ``[N, L, F]``, predictions ``y`` ``[N, L]`` (-1: no target) and anchors ``[N, n]`` (-1:
    none). ``seed`` None: every answer position is an anchor (evaluation), else ``n`` random
    ones per answer, drawn afresh each epoch."""

    def __init__(self, seqs, teach, prompt_lens, batch_size: int, anchors: int, seed: int | None,
                 device="cpu") -> None:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        self.groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        self.g = torch.Generator().manual_seed(seed) if seed is not None else None
        if self.g is not None:
            self.groups = [self.groups[i] for i in torch.randperm(len(self.groups), generator=self.g)]
        self.seqs, self.teach, self.lens = seqs, teach, prompt_lens
        self.anchors, self.device = anchors, device

    def __len__(self) -> int:
        return len(self.groups)

    def _anchors(self, i: int) -> torch.Tensor:
        lo, hi = max(1, self.lens[i] - 1), len(self.seqs[i]) - 2  # slot 1 predicts an answer token
        if hi < lo:
            return torch.empty(0, dtype=torch.long)
        if self.g is None:
            return torch.arange(lo, hi + 1)
        span = hi - lo + 1
        return lo + torch.randperm(span, generator=self.g)[:self.anchors].sort().values

    def __iter__(self):
        for idx in self.groups:
            L = max(len(self.seqs[i]) for i in idx)
            picks = [self._anchors(i) for i in idx]
            n = max(1, max(len(p) for p in picks))
            x = torch.zeros(len(idx), L, dtype=torch.long)
            y = torch.full((len(idx), L), -1, dtype=torch.long)
            f = torch.zeros(len(idx), L, self.teach[idx[0]][0].shape[-1])
            a = torch.full((len(idx), n), -1, dtype=torch.long)
            for b, i in enumerate(idx):
                m = len(self.seqs[i])
                x[b, :m] = torch.tensor(self.seqs[i])
                f[b, :m], y[b, :m] = self.teach[i][0].float(), self.teach[i][1]
                y[b, :max(0, self.lens[i] - 1)] = -1  # predictions of prompt tokens are not learnt
                a[b, :len(picks[b])] = picks[b]
            yield tuple(t.to(self.device) for t in (x, f, y, a))


def block_logits(model: GraftDFlash, embed: torch.Tensor, head: torch.Tensor, x, f, y, a):
    """Draft logits ``[N, n, B - 1, V']`` (``head``: the draft vocabulary's rows) of every
    anchor's block and their target token ids ``[N, n, B - 1]`` (-1: none: a padded anchor,
    past the answer's end)."""
    N, L = x.shape
    n, B = a.shape[1], model.block_size
    anchor = a.clamp(min=0)
    pos = anchor[:, :, None] + torch.arange(B, device=x.device)  # [N, n, B]
    ids = torch.full((N, n, B), model.mask_token_id, dtype=torch.long, device=x.device)
    ids[:, :, 0] = x.gather(1, anchor)
    # row r of block j sees context positions < a_j and every row of block j
    ctx = torch.arange(L, device=x.device)[None, None, :] < anchor.repeat_interleave(B, 1)[:, :, None]
    blk = torch.arange(n, device=x.device).repeat_interleave(B)
    mask = torch.cat([ctx, (blk[:, None] == blk[None, :]).expand(N, -1, -1)], dim=2)  # [N, nB, L + nB]
    h = model(F.embedding(ids.view(N, n * B), embed), pos.view(N, n * B), f, mask)
    logits = h.view(N, n, B, -1)[:, :, 1:] @ head.t()  # [N, n, B - 1, V]
    src = pos[:, :, :-1]  # slot k's target: the base's prediction at position a + k - 1
    tgt = y.gather(1, src.clamp(max=L - 1).view(N, -1)).view(N, n, B - 1)
    tgt = tgt.masked_fill((src >= L) | (a < 0)[:, :, None], -1)
    return logits, tgt


def evaluate(model, embed, head, remap, blocks: Blocks) -> dict:
    """Teacher-forced per-slot accuracy over every anchor, and the mean accepted length greedy
    speculation would reach with K = 1..B-1 drafts: each answer decoded as the engine does,
    the first block after the prompt, the next one after the accepted drafts and the bonus
    token (anchors are not uniform there: hard stretches take more blocks)."""
    B = model.block_size
    hits, total = torch.zeros(B - 1), torch.zeros(B - 1)
    runs: dict[int, dict[int, int]] = {}  # answer -> anchor -> leading correct slots
    with torch.no_grad():
        for idx, (x, f, y, a) in zip(blocks.groups, blocks):
            run = []
            for j in range(0, a.shape[1], 32):  # a few anchors at a time: logits are [N, n, B - 1, V]
                logits, tgt = block_logits(model, embed, head, x, f, y, a[:, j:j + 32])
                ok = (remap[logits.argmax(-1)] == tgt) & (tgt >= 0)  # [N, n', B - 1]
                hits += ok.sum((0, 1)).float().cpu()
                total += (tgt >= 0).sum((0, 1)).float().cpu()
                run.append(ok.int().cumprod(-1).sum(-1).cpu())
            run = torch.cat(run, 1)  # [N, n]
            for b, i in enumerate(idx):
                runs[i] = {int(p): int(r) for p, r in zip(a[b].cpu(), run[b]) if p >= 0}
    mal = []
    for k in range(1, B):
        steps = accepted = 0
        for i, by_anchor in runs.items():
            p = blocks.lens[i]  # the first block: after the prompt and the first sampled token
            while p in by_anchor:
                r = min(by_anchor[p], k)
                steps, accepted, p = steps + 1, accepted + r, p + r + 1
        mal.append(round(1 + accepted / max(1, steps), 3))
    return {"accuracy_per_slot": [round(float(h / max(1, t)), 4) for h, t in zip(hits, total)],
            "mean_accepted_length_per_k": mal, "answers": len(runs)}


def pick_mask_token(seqs: list[list[int]], vocab_size: int) -> int:
    """The mask token: the id least seen in the answers (one never seen, the highest such)."""
    counts = torch.bincount(torch.tensor([t for s in seqs for t in s]), minlength=vocab_size)[:vocab_size]
    return int(vocab_size - 1 - torch.argmin(counts.flip(0)))


def graft_dflash(model_path: str, train_seqs: list[list[int]], held_seqs: list[list[int]], out_dir: str, *,
                 prompt_lens: list[int] | None = None, block_size: int = 8, num_layers: int = 2,
                 target_layer_ids: list[int] | None = None, num_target_layers: int = 4,
                 mask_token_id: int | None = None, gamma: float | None = None, epochs: int = 2,
                 lr: float = 6e-4, batch_size: int = 4, anchors: int = 32, eval_answers: int | None = 64,
                 time_budget_s: float | None = None, draft_vocab_size: int | None = 8192,
                 seed: int = 0, dtype: str = "bfloat16",
                 init_from: str | None = None, hidden_dir: str | None = None, device: str = "cpu",
                 extra_meta: dict | None = None) -> dict:
    """Train a DFlash drafter for ``model_path`` on its answers (token ids: prompt + answer;
    ``prompt_lens`` in train-then-held-out order: only answer tokens are targets) and write it
    to ``out_dir`` in the published format, with the report. ``num_layers`` drafter layers
    start as copies of the base's first ones; ``target_layer_ids`` default to
    ``num_target_layers`` layers spread over the base (the published rule). ``gamma``: slot
    ``k``'s loss weight ``exp(-(k - 1) / gamma)`` (default: the paper's 7 / 5 / 4 for blocks of
    16 / 10 / 8, scaled alike for other sizes). ``time_budget_s``: stop training after this
    many seconds (evaluation excluded), the learning rate decaying over the budget.
    ``eval_answers``: score on at most this many held-out answers (every position is an anchor).
    ``draft_vocab_size``: train and draft over the ids the base predicts most often in the
    training answers (None: the whole vocabulary; the head's product dominates the cost).
    ``init_from``: a drafter folder of this trainer (same base and shape) to continue."""
    cfg = ModelConfig.from_pretrained(model_path)
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (the known token and one mask), got {block_size}")
    if not 1 <= num_layers <= cfg.num_hidden_layers:
        raise ValueError(f"num_layers must be 1..{cfg.num_hidden_layers} (drafter layers start as "
                         f"copies of the base's first layers), got {num_layers}")
    layers = list(target_layer_ids or default_target_layers(cfg.num_hidden_layers, num_target_layers))
    if any(not 0 <= i < cfg.num_hidden_layers for i in layers):
        raise ValueError(f"target_layer_ids {layers} must be layers of the base (0..{cfg.num_hidden_layers - 1})")
    prompt_lens = prompt_lens or [1] * (len(train_seqs) + len(held_seqs))
    fingerprint = base_fingerprint(model_path)
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    base = load_base(model_path)
    embed, head = base["model.embed_tokens.weight"].float(), base_head(model_path, base)
    mask = mask_token_id if mask_token_id is not None else pick_mask_token(train_seqs + held_seqs, cfg.vocab_size)
    if not 0 <= mask < cfg.vocab_size:
        raise ValueError(f"mask_token_id {mask} is outside the base's vocabulary of {cfg.vocab_size}")
    gamma = gamma if gamma is not None else 4.0 + 3.0 * (block_size - 8) / 8
    teach = dflash_teacher(model_path, train_seqs + held_seqs, layers, head, hidden_dir, device)
    t_train, t_held = teach[:len(train_seqs)], teach[len(train_seqs):]
    l_train, l_held = prompt_lens[:len(train_seqs)], prompt_lens[len(train_seqs):]
    answer_preds = [y[max(0, n - 1):] for (_, y), n in zip(t_train, l_train)]  # of answer tokens
    counts = torch.bincount(torch.cat([y[y >= 0] for y in answer_preds]), minlength=cfg.vocab_size)
    vocab_ids = torch.argsort(counts, descending=True, stable=True)[:draft_vocab_size or cfg.vocab_size]
    coverage = float(counts[vocab_ids].sum() / counts.sum().clamp(min=1))
    to_draft = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
    to_draft[vocab_ids] = torch.arange(len(vocab_ids))
    dev = torch.device(device)
    embed, head = embed.to(dev), head[vocab_ids].to(dev)  # head [V', H]
    remap, to_draft = vocab_ids.to(dev), to_draft.to(dev)  # draft index -> token id, and back
    max_len = max(len(s) for s in train_seqs + held_seqs)
    model = GraftDFlash(cfg, num_layers, layers, block_size, mask, max_len)
    model.init_from_base(base)
    del base
    if init_from is not None:
        model.load_exported(load_file(os.path.join(init_from, DFLASH_WEIGHTS)))
    model.to(dev)
    every = max(1, len(held_seqs) // eval_answers) if eval_answers else 1  # an even spread of them
    held = Blocks(held_seqs[::every][:eval_answers], t_held[::every][:eval_answers],
                  l_held[::every][:eval_answers], batch_size, anchors, None, dev)
    report = {"initial": evaluate(model, embed, head, remap, held)}
    log.info("held-out before training: %s", report["initial"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * len(Blocks(train_seqs, t_train, l_train, batch_size, anchors, None))
    weights = torch.exp(-torch.arange(block_size - 1, dtype=torch.float32) / gamma).to(dev)  # [B - 1]
    ckpt = os.path.join(out_dir, "dflash_checkpoint.pt")
    start_epoch, step, trained = 0, 0, 0.0
    if os.path.isfile(ckpt):
        state = torch.load(ckpt, weights_only=False, map_location=dev)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_epoch, step, trained, report = state["epoch"], state["step"], state["seconds"], state["report"]
        log.info("resuming from %s after epoch %d", ckpt, start_epoch)
    for epoch in range(start_epoch, epochs):
        if time_budget_s is not None and trained >= time_budget_s:
            break
        bar = tqdm(Blocks(train_seqs, t_train, l_train, batch_size, anchors, seed + epoch, device=dev),
                   desc=f"epoch {epoch + 1}/{epochs}")
        for x, f, y, a in bar:
            t0 = time.perf_counter()
            done = max(step / steps, trained / time_budget_s if time_budget_s else 0.0)
            for g in opt.param_groups:  # warm-up, then cosine decay over the steps or the budget
                g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
            logits, tgt = block_logits(model, embed, head, x, f, y, a)
            tgt = torch.where(tgt >= 0, to_draft[tgt.clamp(min=0)], -1)  # outside the draft vocab: no loss
            valid = tgt >= 0
            ce = F.cross_entropy(logits[valid], tgt[valid], reduction="none")  # [M]
            w = weights.expand_as(tgt)[valid]
            loss = (ce * w).sum() / w.sum().clamp(min=1e-6)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            trained += time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if time_budget_s is not None and trained >= time_budget_s:
                break
        report[f"epoch_{epoch + 1}"] = {**evaluate(model, embed, head, remap, held), "steps": step,
                                        "train_seconds": round(trained, 1)}
        log.info("epoch %d held-out: %s", epoch + 1, report[f"epoch_{epoch + 1}"])
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "step": step,
                    "seconds": trained, "report": report}, ckpt)
    meta = {"base_model": os.path.basename(os.path.normpath(model_path)), "base_fingerprint": fingerprint,
            "draft_vocab_size": len(vocab_ids), "draft_vocab_coverage": round(coverage, 4),
            "training": {"epochs": epochs, "steps": step, "train_seconds": round(trained, 1),
                         "time_budget_s": time_budget_s, "lr": lr, "batch_size": batch_size,
                         "anchors_per_answer": anchors, "loss_decay_gamma": gamma,
                         "train_sequences": len(train_seqs), "train_tokens": sum(map(len, train_seqs)),
                         "held_out_sequences": len(held_seqs), "scored_held_out": len(held.seqs),
                         "initialised_from": init_from or f"the base's first {num_layers} layers",
                         **(extra_meta or {})},
            "held_out": report}
    model.cpu().export(out_dir, getattr(torch, dtype), {"base_fingerprint": fingerprint},
                       vocab_ids if len(vocab_ids) < cfg.vocab_size else None)
    with open(os.path.join(out_dir, REPORT), "w") as f:
        json.dump(meta, f, indent=2)
    return meta
