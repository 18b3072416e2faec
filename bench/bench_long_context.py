"""Long context: what sequence-sharding the KV cache buys (DCP inside TP, CP as its own dimension).

    python bench/bench_long_context.py [--budget-blocks 64] [--contexts 1024,8192,32768]

The model is a random-weight Llama made with transformers (so transformers can check the
output): hidden 256, 8 query heads and ONE KV head (the MLA-like case, where TP=2 stores that
head twice), 2 layers, vocabulary 1024, 40k positions. Layouts: TP=1, TP=2, TP=2 + DCP=2, CP=2.

1. Capacity at a fixed per-rank budget of ``--budget-blocks`` blocks of 16 tokens: KV bytes per
   token on each rank, the longest prompt the engine admits for 16 new tokens (found through its
   admission check; one token more is refused), and 16 greedy tokens generated at exactly that
   length, compared with transformers' greedy ``generate`` on the same weights.
2. Per context length: prefill time, decode tok/s and the bytes each rank sends into
   collectives per decode step (counted by the communicators), which must not grow with context.

Results: bench/results/long_context.{json,md}. On 2 shared CPU cores more ranks cannot make
decode faster; the traffic and capacity columns are what carries over to GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")
LAYOUTS = {"TP=1": dict(), "TP=2": dict(tensor_parallel_size=2),
           "TP=2+DCP=2": dict(tensor_parallel_size=2, decode_context_parallel_size=2),
           "CP=2": dict(context_parallel_size=2)}
NEW = 16  # tokens generated per measurement


def make_model(path: str, max_pos: int) -> str:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, num_attention_heads=8,
                                   num_key_value_heads=1, intermediate_size=512, num_hidden_layers=2,
                                   max_position_embeddings=max_pos, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.06)
    model.save_pretrained(path, safe_serialization=True)
    return path


def prompt(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [1] + [r.randrange(3, 1024) for _ in range(n - 1)]


def greedy() -> object:
    from dist_engine import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


def longest_admitted(engine, hi: int) -> int:
    """The largest prompt length the admission check accepts (binary search)."""
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            engine.validate(prompt(mid, 0), greedy())
            lo = mid
        except ValueError:
            hi = mid - 1
    return lo


def capacity(path: str, name: str, kw: dict, blocks: int, max_len: int) -> dict:
    from dist_engine import LLM

    with LLM(path, skip_tokenizer_init=True, max_model_len=max_len, num_kv_blocks=blocks,
             enable_prefix_caching=False, **kw) as llm:
        n = longest_admitted(llm.engine, max_len - NEW)
        try:
            llm.engine.validate(prompt(n + 1, 0), greedy())
            refused = False
        except ValueError:
            refused = True
        t0 = time.perf_counter()
        out = llm.generate(prompt_token_ids=[prompt(n, 0)], sampling_params=greedy())[0]
        info = llm.engine.cache_info
        return {"layout": name, "blocks_per_rank": blocks,
                "kv_bytes_per_token_per_rank": info["bytes_per_block"] // info["block_size"],
                "kv_bytes_per_rank": blocks * info["bytes_per_block"], "longest_prompt": n,
                "one_more_refused": refused, "tokens": out.outputs[0].token_ids,
                "seconds": time.perf_counter() - t0,
                "blocks_free_after": llm.engine.blocks.num_free == llm.engine.blocks.num_blocks}


def transformers_greedy(path: str, n: int) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt(n, 0)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    return out[0, n:].tolist()


def sweep(path: str, name: str, kw: dict, contexts: list[int]) -> list[dict]:
    """Prefill, decode and collective bytes per decode step at each context length."""
    from dist_engine import LLM, SamplingParams

    need = (max(contexts) + NEW + 15) // 16 + 4
    rows = []
    with LLM(path, skip_tokenizer_init=True, max_model_len=max(contexts) + NEW + 16,
             num_kv_blocks=need, enable_prefix_caching=False, max_num_batched_tokens=1024, **kw) as llm:
        eng = llm.engine
        for ctx in contexts:
            eng.add_request(f"c{ctx}", prompt(ctx, ctx), SamplingParams(temperature=0, max_tokens=NEW + 1,
                                                                      ignore_eos=True))
            t0 = time.perf_counter()
            while not any(o.outputs[0].token_ids for o in eng.step()):
                pass
            prefill = time.perf_counter() - t0
            before = eng.executor.comm_stats()
            t1, steps = time.perf_counter(), 0
            while eng.has_unfinished():
                eng.step()
                steps += 1
            decode = time.perf_counter() - t1
            after = eng.executor.comm_stats()
            per_group = {g: (after[0][g]["bytes"] - before[0][g]["bytes"]) / steps for g in after[0]}
            rows.append({"layout": name, "context": ctx, "prefill_s": prefill,
                         "prefill_tok_per_s": ctx / prefill, "decode_tok_per_s": steps / decode,
                         "collective_bytes_per_step": sum(per_group.values()),
                         "collective_bytes_per_step_by_group": per_group})
            print(f"{name} ctx {ctx}: prefill {prefill:.1f} s, decode {steps / decode:.1f} tok/s, "
                  f"collective bytes/step/rank {sum(per_group.values()):.0f} {per_group}", flush=True)
    return rows


def prefill_scaling(path: str, ctx: int) -> list[dict]:
    """Prefill of one ``ctx``-token prompt with one CPU thread per rank: CP=1 vs CP=2 (each CP
    rank computes the tokens it stores, so two ranks on two cores split the work)."""
    from dist_engine import LLM

    rows = []
    for cp in (1, 2):
        with LLM(path, skip_tokenizer_init=True, max_model_len=ctx + NEW + 16, cpu_threads=1,
                 num_kv_blocks=(ctx + NEW + 15) // 16 + 4, enable_prefix_caching=False,
                 max_num_batched_tokens=1024, context_parallel_size=cp,
                 executor="ray") as llm:
            from dist_engine import SamplingParams

            eng = llm.engine
            eng.add_request("p", prompt(ctx, 7), SamplingParams(temperature=0, max_tokens=1))
            t0 = time.perf_counter()
            while eng.has_unfinished():
                eng.step()
            rows.append({"cp": cp, "context": ctx, "prefill_s": time.perf_counter() - t0})
        print(f"prefill {ctx} tokens, CP={cp}, 1 thread per rank: {rows[-1]['prefill_s']:.1f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-blocks", type=int, default=64)
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--prefill-context", type=int, default=16384,
                    help="prompt length for the CP=1 vs CP=2 prefill comparison (0: skip)")
    ap.add_argument("--only-prefill", action="store_true")
    a = ap.parse_args()
    contexts = [int(x) for x in a.contexts.split(",")]
    layouts = a.layouts.split(",")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = make_model(tempfile.mkdtemp(prefix="longctx-"), max(contexts + [a.prefill_context]) + 2 * NEW + 32)
    prefill = prefill_scaling(path, a.prefill_context) if a.prefill_context else []
    if a.only_prefill:
        return
    cap_len = 4 * a.budget_blocks * 16
    caps = [capacity(path, name, LAYOUTS[name], a.budget_blocks, cap_len) for name in layouts]
    for c in caps:
        c["matches_transformers"] = transformers_greedy(path, c["longest_prompt"]) == c["tokens"]
        print(f"{c['layout']}: {c['kv_bytes_per_token_per_rank']} B/token/rank, longest prompt "
              f"{c['longest_prompt']} (one more refused: {c['one_more_refused']}), matches "
              f"transformers: {c['matches_transformers']}", flush=True)
    rows = [r for name in layouts for r in sweep(path, name, LAYOUTS[name], contexts)]
    base = {c["layout"]: c["longest_prompt"] for c in caps}
    report = {"budget_blocks": a.budget_blocks, "capacity": caps, "sweep": rows, "prefill": prefill}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "long_context.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"Capacity at {a.budget_blocks} blocks x 16 tokens per rank (1-KV-head model):", "",
             "| layout | KV B/token/rank | longest prompt (+16 new) | vs TP=1 | one more refused | "
             "= transformers | blocks free after |", "|---|---|---|---|---|---|---|"]
    for c in caps:
        ratio = c["longest_prompt"] / base["TP=1"] if "TP=1" in base else float("nan")
        lines.append(f"| {c['layout']} | {c['kv_bytes_per_token_per_rank']} | {c['longest_prompt']} | "
                     f"{ratio:.2f}x | {c['one_more_refused']} | {c['matches_transformers']} | "
                     f"{c['blocks_free_after']} |")
    lines += ["", "Per context length (collective bytes: sent by one rank per decode step):", "",
              "| layout | context | prefill s | prefill tok/s | decode tok/s | collective B/step/rank |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['context']} | {r['prefill_s']:.1f} | {r['prefill_tok_per_s']:.0f} | "
                     f"{r['decode_tok_per_s']:.1f} | {r['collective_bytes_per_step']:.0f} |")
    if len(prefill) == 2:
        lines += ["", f"Prefill of a {prefill[0]['context']}-token prompt, one CPU thread per rank: CP=1 "
                  f"{prefill[0]['prefill_s']:.1f} s, CP=2 {prefill[1]['prefill_s']:.1f} s "
                  f"({prefill[0]['prefill_s'] / prefill[1]['prefill_s']:.2f}x faster)."]
    text = "\n".join(lines)
    with open(os.path.join(RESULTS, "long_context.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
