"""Self-distillation data: the base model's own answers to the graft prompts, made with our
batched engine and kept in a JSON-lines file (one object per answer), so a run can resume."""

from __future__ import annotations

import json
import os

from tqdm import tqdm


def generate_answers(model: str, prompts: list[str], out_file: str, *, samples_per_prompt: int = 1,
                     temperature: float = 0.7, max_tokens: int = 256, dtype: str = "float32",
                     batch: int = 64) -> list[dict]:
    """Answer every prompt ``samples_per_prompt`` times (answer 0 greedy, the rest sampled at
    ``temperature`` with fixed seeds); append to ``out_file``, skipping answers already there."""
    from dist_engine import LLM, SamplingParams

    done = load_answers(out_file)
    have = {(r["prompt"], r["sample"]) for r in done}
    todo = [(p, k) for p in prompts for k in range(samples_per_prompt) if (p, k) not in have]
    if not todo:
        return done
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    with LLM(model, dtype=dtype, max_num_seqs=batch, max_num_batched_tokens=1024) as llm, \
            open(out_file, "a") as f, tqdm(total=len(todo), desc="answers", unit="ans") as bar:
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p, _ in chunk]
            params = [SamplingParams(max_tokens=max_tokens) if k == 0 else
                      SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=1000 * k + j)
                      for j, (_, k) in enumerate(chunk)]
            for (p, k), pid, out in zip(chunk, ids, llm.generate(prompt_token_ids=ids, sampling_params=params)):
                rec = {"prompt": p, "sample": k, "prompt_ids": pid, "output_ids": out.outputs[0].token_ids}
                f.write(json.dumps(rec) + "\n")
                done.append(rec)
            f.flush()
            bar.update(len(chunk))
    return done


def load_answers(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
