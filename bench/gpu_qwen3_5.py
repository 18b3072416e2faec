"""The Qwen3.5 (hybrid Gated DeltaNet) part of ``bench/gpu_check.py``: on the device,

1. parity with transformers on the tiny random dense and MoE checkpoints of the tests (fp32, 24
   greedy tokens identical, top-5 logprob error), a 300-token prompt (several delta-rule chunks);
2. exactness: MTP speculation K = 1..4 (batch of 8, greedy and seeded) equal to plain
   decoding, and the batch re-sent (prefix-cache hits resuming from state checkpoints) equal
   to its first run;
3. speed in bf16 on the shape of ``bench/bench_hybrid.py`` against a Llama of the same hidden
   size: decode tok/s at each context (batch 1), 16 concurrent sequences, a K=3 MTP step
   against a plain one, and transformers' decode tok/s at the first context.
"""

from __future__ import annotations

import os
import random
import time

import torch

TINY_PROMPT = torch.randint(3, 320, (300,), generator=torch.Generator().manual_seed(1)).tolist()


def parity(tmp: str, dev: str, name: str) -> dict:
    from gpu_check import against_transformers

    from conftest import hf_model, make_qwen3_5
    from dist_engine import LLM, SamplingParams

    path = make_qwen3_5(name, os.path.join(tmp, name))
    n = 24
    with LLM(path, device=dev, skip_tokenizer_init=True, max_model_len=512, num_kv_blocks=64,
             speculative="none") as llm:
        out = llm.generate(prompt_token_ids=[TINY_PROMPT], sampling_params=SamplingParams(
            temperature=0, max_tokens=n, ignore_eos=True, logprobs=5))[0].outputs[0]
    hf = hf_model(path).to(dev)
    return against_transformers(hf, TINY_PROMPT, out, dev)


def exactness(tmp: str, dev: str, quick: bool) -> dict:
    from conftest import make_qwen3_5
    from dist_engine import LLM, SamplingParams

    path = make_qwen3_5("qwen3_5", os.path.join(tmp, "qwen3_5_spec"))
    g = torch.Generator().manual_seed(5)
    prompts = [TINY_PROMPT[:n] for n in (150, 64, 200)] + [torch.randint(3, 320, (n,), generator=g).tolist()
                                                          for n in (7, 100, 129, 1, 250)]
    params = [SamplingParams(temperature=t, seed=7, max_tokens=32, ignore_eos=True) for t in (0.0, 0.8)] * 4
    args = dict(device=dev, skip_tokenizer_init=True, max_model_len=512, num_kv_blocks=512,
                state_checkpoint_interval=64)

    def run(**kw):
        with LLM(path, **args, **kw) as llm:
            first = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
            again = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
            return first, again, llm.engine.state.checkpoints.hits

    plain, plain_again, _ = run(speculative="none")
    res = {"resent_equal_plain": plain_again == plain, "identical": {}}
    for k in (2,) if quick else (1, 2, 3, 4):
        got, again, hits = run(speculative_config=dict(method="mtp", num_speculative_tokens=k,
                                                       max_draft_tokens_per_step=0, min_draft_acceptance=0.0))
        res["identical"][k] = got == plain and again == plain
        res.setdefault("checkpoint_hits", {})[k] = hits
    return res


def _prompt(n: int) -> list[int]:
    r = random.Random(1)
    return [1] + [r.randrange(3, 1024) for _ in range(n - 1)]  # within the dry run's vocabulary


def _tok_s(llm, prompts, n: int, dev: str) -> float:
    from gpu_check import sync

    from dist_engine import SamplingParams

    sync(dev)
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True))
    sync(dev)
    m = outs[0].metrics
    return 1.0 / m.time_per_output_token if len(prompts) == 1 else \
        sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def speed(tmp: str, dev: str, quick: bool) -> dict:
    from bench_hybrid import make_models, transformers_decode

    from dist_engine import LLM

    contexts, n = ([256], 8) if quick else ([1024, 4096, 16384], 128)
    small = dict(hidden_size=128, intermediate_size=256, vocab_size=1024, head_dim=32, linear_key_head_dim=32,
                 linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2)
    paths = make_models(os.path.join(tmp, "hybrid_speed"), **(small if quick else {}))
    res = {}
    base = dict(device=dev, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=max(contexts) + n + 64,
                kv_cache_memory="8GiB", max_num_seqs=16)
    for name, path in paths.items():
        r = res[name] = {"decode_tok_s": {}}
        with LLM(path, speculative="none", **base) as llm:
            _tok_s(llm, [_prompt(64)], 4, dev)
            for ctx in contexts:
                r["decode_tok_s"][ctx] = _tok_s(llm, [_prompt(ctx)], n, dev)
            r["c16_tok_s"] = _tok_s(llm, [[1, 5 + i] + _prompt(contexts[0])[2:] for i in range(16)], n, dev)
    spec = dict(method="mtp", num_speculative_tokens=3, min_draft_acceptance=0.0, max_draft_tokens_per_step=0)
    with LLM(paths["hybrid"], speculative_config=spec, **base) as llm:
        _tok_s(llm, [_prompt(64)], 4, dev)
        before = llm.engine.spec_stats.num_steps
        k3 = _tok_s(llm, [_prompt(contexts[0])], n, dev)
        steps = llm.engine.spec_stats.num_steps - before
    per_step = (n - 1) / max(steps, 1)
    res["hybrid"]["k3_tok_s"] = k3
    res["hybrid"]["k3_step_cost_vs_plain"] = per_step * res["hybrid"]["decode_tok_s"][contexts[0]] / k3
    for name, path in paths.items():
        res[name]["transformers_tok_s"] = transformers_decode(path, contexts[0], min(n, 32), device=dev,
                                                              dtype=torch.bfloat16)
    return res


def check(tmp: str, dev: str, quick: bool, guarded) -> dict:
    out = {"parity": {name: guarded(parity, tmp, dev, name) for name in ("qwen3_5", "qwen3_5_moe")},
           "exactness": guarded(exactness, tmp, dev, quick)}
    out["speed"] = guarded(speed, tmp, dev, quick)
    return out


def report(res: dict) -> list[str]:
    lines = ["", "## Qwen3.5 hybrid (Gated DeltaNet + gated attention)", ""]
    for name, r in res.get("parity", {}).items():
        lines.append(f"- parity {name} (fp32, 300-token prompt, 24 greedy tokens): {r}")
    lines.append(f"- exactness (MTP K=1..4 and re-sent prompts = plain): {res.get('exactness')}")
    s = res.get("speed", {})
    if "hybrid" in s:
        h, ll = s["hybrid"], s["llama"]
        lines += ["", "| bf16, batch 1 | " + " | ".join(f"{c} tok/s" for c in h["decode_tok_s"]) +
                  " | 16 concurrent tok/s | transformers tok/s (first context) |",
                  "|---|" + "---|" * (len(h["decode_tok_s"]) + 2)]
        for name, r in (("hybrid", h), ("Llama", ll)):
            lines.append(f"| {name} | " + " | ".join(f"{v:.0f}" for v in r["decode_tok_s"].values()) +
                         f" | {r['c16_tok_s']:.0f} | {r['transformers_tok_s']:.0f} |")
        lines.append(f"\nK=3 MTP step / plain step (hybrid, random MTP layer): {h['k3_step_cost_vs_plain']:.2f}")
    elif s:
        lines.append(f"- speed: {s}")
    return lines
