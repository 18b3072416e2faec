"""DeepSeek-V3 family: latent KV cache size, decode speed per layout, FP8 weight memory.

    python bench/bench_deepseek.py [--tokens 64]

A small random DeepSeek-V3 made by transformers (hidden 512, 8 heads, kv_lora_rank 128, rope
dim 32, q_lora_rank 192, 4 layers of which 3 are MoE with 16 routed experts in 4 groups, 4 per
token, one shared expert), and an FP8 copy of it in DeepSeek's format (128 x 128 tiles).

1. KV bytes per token and layer: the engine's latent cache (kv_lora_rank + rope dim) against
   the expanded per-head K/V a GQA-style cache would hold, and per rank under TP=2 vs
   TP=2 + DCP=2 (longest prompt admitted at a fixed budget of blocks per rank).
2. Decode tok/s at batch 1 (256-token prompt, greedy): TP=1, TP=2, TP=2 + DCP=2.
3. Weight bytes resident per rank: FP8 checkpoint (kept FP8) vs the same model in bfloat16.

Results: bench/results/deepseek.{json,md}. 2 CPU cores: more ranks do not decode faster here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CFG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=128,
           q_lora_rank=192, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
           n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
           routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=4096,
           bos_token_id=1, eos_token_id=2)


def make_models(root: str) -> tuple[str, str]:
    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_deepseek_v3 import _fp8_pair

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(**CFG),
                                                          dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.03)
    src = os.path.join(root, "src")
    model.save_pretrained(src, safe_serialization=True)
    fp8, plain = os.path.join(root, "fp8"), os.path.join(root, "plain")
    _fp8_pair(src, fp8, plain, (128, 128))
    return fp8, plain


def prompt(n: int) -> list[int]:
    r = random.Random(0)
    return [1] + [r.randrange(3, 4096) for _ in range(n - 1)]


def decode_speed(path: str, tokens: int, **kw) -> dict:
    from dist_engine import LLM, SamplingParams

    with LLM(path, skip_tokenizer_init=True, max_model_len=1024, num_kv_blocks=128, **kw) as llm:
        p = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        llm.generate(prompt_token_ids=[prompt(32)], sampling_params=SamplingParams(max_tokens=4))
        out = llm.generate(prompt_token_ids=[prompt(256)], sampling_params=p)[0]
        m = out.metrics
        info = llm.engine.cache_info
        per_token = info["bytes_per_block"] // info["block_size"]
        blocks_per_rank = info["num_blocks"] // llm.config.parallel.num_kv_shards
        return {"decode_tok_per_s": 1.0 / m.time_per_output_token, "kv_bytes_per_token_per_rank": per_token,
                "weight_bytes_per_rank": info["weight_bytes"], "blocks_per_rank": blocks_per_rank,
                "longest_context_tokens": info["num_blocks"] * info["block_size"],
                "tokens": out.outputs[0].token_ids}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    fp8, plain = make_models(tempfile.mkdtemp(prefix="ds-bench-"))
    layers = CFG["num_hidden_layers"]
    latent = (CFG["kv_lora_rank"] + CFG["qk_rope_head_dim"]) * 4  # fp32 bytes per token and layer
    expanded = CFG["num_attention_heads"] * (CFG["qk_nope_head_dim"] + CFG["qk_rope_head_dim"]
                                             + CFG["v_head_dim"]) * 4
    rows = {}
    for name, kw in (("TP=1", {}), ("TP=2", dict(tensor_parallel_size=2)),
                     ("TP=2+DCP=2", dict(tensor_parallel_size=2, decode_context_parallel_size=2))):
        rows[name] = decode_speed(plain, a.tokens, dtype="float32", **kw)
        print(name, {k: v for k, v in rows[name].items() if k != "tokens"}, flush=True)
    same = len({tuple(r["tokens"]) for r in rows.values()}) == 1
    bf16_row = decode_speed(plain, a.tokens, dtype="bfloat16")
    weights = {"bfloat16": bf16_row["weight_bytes_per_rank"]}
    t0 = time.perf_counter()
    fp8_row = decode_speed(fp8, a.tokens, dtype="bfloat16")
    weights["fp8 (kept fp8)"] = fp8_row["weight_bytes_per_rank"]
    print("fp8", {k: v for k, v in fp8_row.items() if k != "tokens"}, f"{time.perf_counter() - t0:.0f} s", flush=True)
    report = {"config": CFG, "kv_latent_bytes_per_token_layer": latent, "kv_expanded_bytes_per_token_layer": expanded,
              "layouts": rows, "greedy_tokens_identical_across_layouts": same, "weights": weights,
              "fp8_decode_tok_per_s": fp8_row["decode_tok_per_s"]}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "deepseek.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"KV cache per token and layer (float32; half in bf16): latent {latent} B vs expanded per-head K/V {expanded} B "
             f"({expanded / latent:.1f}x smaller); engine-measured {rows['TP=1']['kv_bytes_per_token_per_rank'] // layers} B.",
             "", "| layout (float32) | KV B/token/rank | blocks/rank | longest context | decode tok/s (batch 1) |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['kv_bytes_per_token_per_rank']} | {r['blocks_per_rank']} | "
                     f"{r['longest_context_tokens']} | {r['decode_tok_per_s']:.1f} |")
    lines += ["", f"Greedy tokens identical across layouts: {same}.", "",
              f"Weights per rank: bfloat16 {weights['bfloat16'] / 2**20:.1f} MiB, FP8 checkpoint kept in FP8 "
              f"{weights['fp8 (kept fp8)'] / 2**20:.1f} MiB ({weights['fp8 (kept fp8)'] / weights['bfloat16']:.2f}x); "
              f"Decode in bfloat16: {bf16_row['decode_tok_per_s']:.1f} tok/s with bf16 weights, "
              f"{fp8_row['decode_tok_per_s']:.1f} tok/s with FP8 weights (dequantized per layer on every call)."]
    text = "\n".join(lines)
    with open(os.path.join(RESULTS, "deepseek.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
