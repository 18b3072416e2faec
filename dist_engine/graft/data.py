"""Self-distillation data: the base model's own answers to the graft prompts, made with our
batched engine and kept in a JSON-lines file (one object per answer), so a run can resume.

The engine also returns the final-norm hidden state of every position it ran (the teacher
signal the graft trains on), and with ``layers`` the outputs of those decoder layers (a DFlash
drafter's context features); they are saved next to the answers, one file per batch, so the
teacher pass only has to compute what is missing."""

from __future__ import annotations

import glob
import json
import os

import torch
from tqdm import tqdm


def generate_answers(model: str, prompts: list[str], out_file: str, *, samples_per_prompt: int = 1,
                     temperature: float = 0.7, max_tokens: int = 256, dtype: str = "float32",
                     batch: int = 64, hidden_dir: str | None = None, device: str = "cpu",
                     layers: tuple[int, ...] = ()) -> list[dict]:
    """Answer every prompt ``samples_per_prompt`` times (answer 0 greedy, the rest sampled at
    ``temperature`` with fixed seeds); append to ``out_file``, skipping answers already there.
    ``hidden_dir``: also save each answer's final-norm hidden states (``[L - 1, H]`` for its L
    prompt + answer tokens) there, a file per batch (see :func:`load_hidden`), and with
    ``layers`` those decoder layers' outputs (``[L - 1, len(layers) * H]``, :func:`load_features`)."""
    from dist_engine import LLM, SamplingParams

    done = load_answers(out_file)
    have = {(r["prompt"], r["sample"]) for r in done}
    todo = [(p, k) for p in prompts for k in range(samples_per_prompt) if (p, k) not in have]
    if not todo:
        return done
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    with LLM(model, dtype=dtype, device=device, max_num_seqs=batch, max_num_batched_tokens=1024,
             speculative="none", hidden_state_layers=tuple(layers) if hidden_dir else ()) as llm, \
            open(out_file, "a") as f, tqdm(total=len(todo), desc="answers", unit="ans") as bar:
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p, _ in chunk]
            keep = hidden_dir is not None
            params = [SamplingParams(max_tokens=max_tokens, return_hidden_states=keep) if k == 0 else
                      SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=1000 * k + j,
                                     return_hidden_states=keep)
                      for j, (_, k) in enumerate(chunk)]
            seqs, hidden = [], []
            for (p, k), pid, out in zip(chunk, ids, llm.generate(prompt_token_ids=ids, sampling_params=params)):
                rec = {"prompt": p, "sample": k, "prompt_ids": pid, "output_ids": out.outputs[0].token_ids}
                f.write(json.dumps(rec) + "\n")
                done.append(rec)
                seqs.append(pid + rec["output_ids"])
                hidden.append(out.outputs[0].hidden_states.cpu())
            if keep:
                save_hidden(hidden_dir, f"{len(done):07d}", seqs, hidden, tuple(layers))
            f.flush()
            bar.update(len(chunk))
    return done


def load_answers(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def split_answers(recs: list[dict], held_prompts: list[str], train_prompts: list[str] | None = None
                  ) -> tuple[tuple[list[list[int]], list[int]], tuple[list[list[int]], list[int]]]:
    """(training, held-out) answers, each as (prompt + answer token ids, prompt lengths);
    ``train_prompts``: only answers to those count as training ones (default: all others)."""
    held, train = set(held_prompts), set(train_prompts) if train_prompts is not None else None
    out: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    for r in recs:
        if train is not None and r["prompt"] not in held and r["prompt"] not in train:
            continue
        seqs, lens = out[r["prompt"] in held]
        seqs.append(r["prompt_ids"] + r["output_ids"])
        lens.append(len(r["prompt_ids"]))
    return out[False], out[True]


def save_hidden(hidden_dir: str, name: str, seqs: list[list[int]], hidden: list[torch.Tensor],
                layers: tuple[int, ...] = ()) -> None:
    """One batch of sequences and their final-norm hidden states ``[L - 1, H]`` (fp32); rows
    the engine widened with ``layers``' outputs (``[L - 1, H * (1 + len(layers))]``) keep those
    apart in fp16 (context features need no more, and they are most of the bytes)."""
    os.makedirs(hidden_dir, exist_ok=True)
    H = hidden[0].shape[-1] // (1 + len(layers)) if hidden else 0
    part = {"seqs": seqs, "hidden": [h[:, :H].float() for h in hidden]}
    if layers:
        part.update(layers=list(layers), features=[h[:, H:].half() for h in hidden])
    torch.save(part, os.path.join(hidden_dir, f"{name}.pt"))


def load_hidden(hidden_dir: str | None) -> dict[tuple[int, ...], torch.Tensor]:
    """Sequence -> final-norm hidden states ``[L - 1, H]`` saved by :func:`generate_answers`."""
    out: dict[tuple[int, ...], torch.Tensor] = {}
    if not hidden_dir:
        return out
    for path in sorted(glob.glob(os.path.join(hidden_dir, "*.pt"))):
        part = torch.load(path, weights_only=True)
        out.update((tuple(s), h) for s, h in zip(part["seqs"], part["hidden"]))
    return out


def load_features(hidden_dir: str | None, layers: list[int]
                  ) -> dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]:
    """Sequence -> (final-norm states ``[L - 1, H]``, the outputs of decoder ``layers``
    ``[L - 1, len(layers) * H]`` fp16) saved by :func:`generate_answers`, from the files that
    saved (at least) those layers; each file is read once."""
    out: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    if not hidden_dir:
        return out
    for path in sorted(glob.glob(os.path.join(hidden_dir, "*.pt"))):
        part = torch.load(path, weights_only=True)
        have = part.get("layers") or []
        if not set(layers) <= set(have):
            continue
        H = part["hidden"][0].shape[-1] if part["hidden"] else 0
        cols = torch.cat([torch.arange(have.index(i) * H, (have.index(i) + 1) * H) for i in layers])
        out.update((tuple(s), (h, f[:, cols])) for s, h, f in zip(part["seqs"], part["hidden"], part["features"]))
    return out
