"""Gemma 4: MoE decode speed against transformers, and the KV memory the sliding groups save.

    python bench/bench_gemma4.py [--tokens 64] [--context 3000] [--rounds 3] [--threads 2]

A random Gemma 4 MoE of the 26B-A4B's structure at a size two shared CPU cores can run (hidden
1024, 6 layers: sliding, sliding, global twice over; 8 query heads; sliding layers 4 KV heads
of dim 128 over a 512-token window, global layers one KV head of dim 256 with K = V and
proportional RoPE; 16 experts, 4 per token, beside a dense MLP; vocabulary 8192; logits capped
at 30), made by transformers.

1. Decode tok/s at batch 1 (128-token prompt, greedy, float32 and bfloat16): the engine's time
   per output token against transformers' ``generate`` (decode time: a generation of N + 1
   tokens less one of 1 token), in alternating rounds (best of each); greedy tokens compared.
2. KV memory at a long context (one ``--context``-token prompt + 32 decoded tokens): each
   paged group's bytes per token from the engine's accounting, and the blocks each group holds
   at its peak with sliding blocks given back (the engine) and kept (the same run with
   ``free_behind_window`` disabled); and at a fixed 64 MiB KV budget, the longest context the
   engine's layout admits against the same budget with every layer keeping every position.
3. Drafting cost: time per output token with K = 3 drafts from a random Gemma 4 assistant
   drafter (hidden 256, a sliding and a global layer) and a random DFlash drafter (one layer of
   the target's width, blocks of 4) relative to plain decoding, float32, alternating rounds.
   Random drafters accept next to nothing: this is what drafting costs a step, which a trained
   drafter's accepted tokens must pay back (no trained drafter for this shape exists here).

Results: bench/results/gemma4.{json,md}.
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
S, F = "sliding_attention", "full_attention"
MOE_SHAPE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=512, num_hidden_layers=6,
                 layer_types=[S, S, F, S, S, F], num_attention_heads=8, num_key_value_heads=4,
                 head_dim=128, global_head_dim=256, num_global_key_value_heads=1,
                 attention_k_eq_v=True, sliding_window=512, enable_moe_block=True, num_experts=16,
                 top_k_experts=4, moe_intermediate_size=256, final_logit_softcapping=30.0,
                 hidden_size_per_layer_input=0, max_position_embeddings=32768, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)


def make_shape(path: str, shape: dict, dtype: torch.dtype = torch.float32, device: str = "cpu") -> str:
    """transformers' random Gemma 4 of ``shape`` saved to ``path``."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma4ForCausalLM(Gemma4TextConfig(**shape)).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return path


def prompt(n: int, seed: int = 0) -> list[int]:
    r = random.Random(seed)
    return [1] + [r.randrange(3, MOE_SHAPE["vocab_size"]) for _ in range(n - 1)]


def ours_decode(path: str, dtype: str, tokens: int, rounds: int) -> tuple[float, list[int]]:
    from dist_engine import LLM, SamplingParams

    with LLM(path, dtype=dtype, skip_tokenizer_init=True, max_model_len=1024, num_kv_blocks=128,
             cpu_threads=torch.get_num_threads()) as llm:
        sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        llm.generate(prompt_token_ids=[prompt(32, 1)], sampling_params=SamplingParams(max_tokens=4))
        best, out = 0.0, None
        for _ in range(rounds):
            out = llm.generate(prompt_token_ids=[prompt(128)], sampling_params=sp)[0]
            best = max(best, 1.0 / out.metrics.time_per_output_token)
        return best, out.outputs[0].token_ids


def hf_decode(path: str, dtype: str, tokens: int, rounds: int) -> tuple[float, list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt(128)])

    def run(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()

    run(4)
    best, toks = 0.0, []
    for _ in range(rounds):
        first, _ = run(1)
        whole, toks = run(tokens + 1)
        best = max(best, tokens / (whole - first))
    return best, toks[:tokens]


def kv_memory(path: str, context: int) -> dict:
    """Peak blocks per group over a long prompt and 32 decoded tokens, sliding blocks given back
    or kept; the engine's bytes per token per group; the longest context at a 64 MiB budget."""
    from dist_engine import LLM, SamplingParams
    from dist_engine.kv_cache import window_groups

    res: dict = {}
    bs = 16
    for give_back in (True, False):
        original = window_groups.WindowGroups.free_behind_window
        if not give_back:
            window_groups.WindowGroups.free_behind_window = lambda self, seq: None
        try:
            with LLM(path, skip_tokenizer_init=True, max_model_len=context + 64, block_size=bs,
                     num_kv_blocks=(context + 64) // bs + 8, max_num_batched_tokens=512) as llm:
                eng = llm.engine
                per_block = eng.cache_info["bytes_per_block_by_group"]
                managers = {"full": eng.blocks, **eng.others.managers}
                eng.add_request("long", prompt(context, 2), SamplingParams(temperature=0, max_tokens=32,
                                                                           ignore_eos=True))
                peak = dict.fromkeys(managers, 0)
                t = time.perf_counter()
                while eng.has_unfinished():
                    eng.step()
                    for g, bm in managers.items():
                        peak[g] = max(peak[g], bm.num_blocks - bm.num_free)
                seconds = time.perf_counter() - t
        finally:
            window_groups.WindowGroups.free_behind_window = original
        key = "given_back" if give_back else "kept"
        res[key] = {"peak_blocks": peak, "seconds": seconds,
                    "peak_kv_bytes": sum(peak[g] * per_block[g] for g in peak)}
        res["bytes_per_token"] = {g: per_block[g] / bs for g in per_block}
    budget = 64 * 2**20
    with LLM(path, skip_tokenizer_init=True, max_model_len=32768, block_size=bs, kv_cache_memory=budget,
             max_num_seqs=1) as llm:
        layout = dict(llm.engine.layout.blocks)
    res["budget_64MiB"] = {"layout_blocks": layout, "longest_context": layout["full"] * bs,
                            "every_layer_full_attention": int(budget / sum(res["bytes_per_token"].values()))}
    return res


def drafting_cost(path: str, tmp: str, tokens: int, rounds: int) -> dict:
    import sys

    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

    from dist_engine import LLM, SamplingParams

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_dflash import make_drafter

    torch.manual_seed(0)
    text = Gemma4TextConfig(**{**MOE_SHAPE, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
                               "layer_types": [S, F], "num_kv_shared_layers": 2, "enable_moe_block": False,
                               "vocab_size_per_layer_input": 0,
                               "num_experts": None, "top_k_experts": None, "moe_intermediate_size": None})
    asst = Gemma4AssistantForCausalLM(Gemma4AssistantConfig(
        text_config=text, backbone_hidden_size=MOE_SHAPE["hidden_size"], use_ordered_embeddings=True,
        num_centroids=64, centroid_intermediate_top_k=8))
    asst.masked_embedding.token_ordering.copy_(torch.randperm(MOE_SHAPE["vocab_size"]))
    asst.save_pretrained(os.path.join(tmp, "assistant"), safe_serialization=True)
    dflash = make_drafter(os.path.join(tmp, "dflash"), layers=[1, 3], mask=MOE_SHAPE["vocab_size"] - 1,
                          vocab=MOE_SHAPE["vocab_size"], hidden_size=1024, intermediate_size=2048,
                          num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                          block_size=4, input_embedding_scale=32.0)
    runs = {"plain": {}, "gemma4_assistant": {"speculative_model": os.path.join(tmp, "assistant")},
            "dflash": {"speculative_model": dflash}}
    llms = {name: LLM(path, skip_tokenizer_init=True, max_model_len=1024, num_kv_blocks=128,
                      cpu_threads=torch.get_num_threads(), **kw,
                      **({"num_speculative_tokens": 3, "min_draft_acceptance": 0.0} if kw else {}))
            for name, kw in runs.items()}
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    best = dict.fromkeys(runs, 0.0)
    try:
        for llm in llms.values():
            llm.generate(prompt_token_ids=[prompt(32, 1)], sampling_params=SamplingParams(max_tokens=4))
        for _ in range(rounds):
            for name, llm in llms.items():
                out = llm.generate(prompt_token_ids=[prompt(128)], sampling_params=sp)[0]
                best[name] = max(best[name], 1.0 / out.metrics.time_per_output_token)
        stats = {name: llm.engine.spec_stats for name, llm in llms.items() if name != "plain"}
    finally:
        for llm in llms.values():
            llm.shutdown()
    return {name: {"tok_s": best[name], "vs_plain": best[name] / best["plain"],
                   **({"drafted": stats[name].num_draft_tokens, "accepted": stats[name].num_accepted_tokens}
                      if name in stats else {})} for name in runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="both engines'")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = make_shape(os.path.join(tempfile.mkdtemp(prefix="gemma4-bench-"), "moe"), MOE_SHAPE)
    report: dict = {"shape": MOE_SHAPE, "threads": torch.get_num_threads(), "decode": {}}
    for dtype in ("float32", "bfloat16"):
        ours, ours_toks = ours_decode(path, dtype, a.tokens, a.rounds)
        hf, hf_toks = hf_decode(path, dtype, a.tokens, a.rounds)
        same = next((i for i, (x, y) in enumerate(zip(ours_toks, hf_toks)) if x != y), None)
        report["decode"][dtype] = {"ours_tok_s": ours, "transformers_tok_s": hf, "ratio": ours / hf,
                                   "first_token_difference": same}
        print(dtype, report["decode"][dtype], flush=True)
    report["kv_memory"] = kv = kv_memory(path, a.context)
    print(json.dumps(kv), flush=True)
    report["drafting_cost"] = cost = drafting_cost(path, os.path.dirname(path), a.tokens, a.rounds)
    print(json.dumps(cost), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "gemma4.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["Gemma 4 MoE random shape (hidden 1024, 6 layers 2:1 sliding:global, 16 experts top 4 + dense "
             f"MLP), batch 1, 128-token prompt, {a.tokens} greedy tokens, {report['threads']} threads, "
             f"best of {a.rounds} alternating rounds.", "",
             "| dtype | ours decode tok/s | transformers decode tok/s | ratio | greedy tokens equal |",
             "|---|---|---|---|---|"]
    for dtype, r in report["decode"].items():
        eq = "all" if r["first_token_difference"] is None else f"first {r['first_token_difference']}"
        lines.append(f"| {dtype} | {r['ours_tok_s']:.1f} | {r['transformers_tok_s']:.1f} | {r['ratio']:.2f}x | {eq} |")
    bpt, given, kept = kv["bytes_per_token"], kv["given_back"], kv["kept"]
    lines += ["", f"KV cache at a {a.context}-token context + 32 decoded (float32, blocks of 16; engine accounting):", "",
              "| group | bytes/token | peak blocks, given back | peak blocks, kept |", "|---|---|---|---|"]
    for g in bpt:
        lines.append(f"| {g} | {bpt[g]:g} | {given['peak_blocks'][g]} | {kept['peak_blocks'][g]} |")
    b = kv["budget_64MiB"]
    lines += ["", f"Peak KV bytes: {given['peak_kv_bytes'] / 2**20:.1f} MiB given back vs "
              f"{kept['peak_kv_bytes'] / 2**20:.1f} MiB kept ({kept['peak_kv_bytes'] / given['peak_kv_bytes']:.2f}x).",
              f"At a 64 MiB KV budget (one sequence): longest context {b['longest_context']} tokens "
              f"(layout {b['layout_blocks']}) vs {b['every_layer_full_attention']} if every layer kept "
              f"every position ({b['longest_context'] / b['every_layer_full_attention']:.2f}x)."]
    lines += ["", "Drafting cost, K = 3 random drafters (float32, batch 1; random drafters accept next to "
              "nothing, so this is the cost a trained drafter's accepted tokens must repay):", "",
              "| method | tok/s | vs plain | drafted | accepted |", "|---|---|---|---|---|"]
    for name, r in cost.items():
        lines.append(f"| {name} | {r['tok_s']:.1f} | {r['vs_plain']:.2f}x | {r.get('drafted', '')} | "
                     f"{r.get('accepted', '')} |")
    text = "\n".join(lines)
    with open(os.path.join(RESULTS, "gemma4.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
