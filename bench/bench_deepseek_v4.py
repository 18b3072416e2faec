"""DeepSeek-V4's caches and weights as the engine accounts for them, and its decode cost.

    python bench/bench_deepseek_v4.py [--contexts 1024,2048,4096,8192] [--budget-gib 16] [--quick]

1. KV bytes per token of one sequence at 128K / 524K / 1M context, from the engine's own cache
   kinds (each layer's ``cache_kinds`` of the model built on the meta device, then
   ``bytes_per_block`` per group, the sliding-window blocks ``plan_layout`` reserves per
   sequence, and the compressors' per-sequence state): DeepSeek-V4-Flash (transformers'
   default config: 43 layers, window 128, ratios 4 and 128, indexer keys) against DeepSeek-V3's
   MLA latent (61 layers) and a GQA model (Llama-3.1-70B's shape: 80 layers, 8 KV heads), bf16.
   The accounting is checked against the bytes a small V4 engine really allocates.
2. The longest context one sequence gets from a fixed per-rank KV budget (``--budget-gib``) at
   DCP=1 (TP=1) and DCP=2 (TP=2, the single KV head's rows striped over both ranks): the
   layout ``plan_layout`` makes, as the start-up log states it.
3. Decode step time against context for a small random V4 shape and a dense-attention Llama of
   the same hidden size, layers and heads (fp32 on CPU, one sequence, the median of 32 decode
   steps after a prompt of each length; ``--contexts``). Run with ``OMP_WAIT_POLICY=passive``
   on a shared machine (docs/performance.md: spinning OpenMP pools).
4. Resident weight bytes of a small V4 shape with FP8 weights and MXFP4 routed experts, FP8
   experts, and bf16 (the engine's per-format weight bytes).

Results: bench/results/deepseek_v4.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
RESULTS = os.path.join(ROOT, "bench", "results")
GIB = 2**30
CONTEXTS = {"128K": 128 * 1024, "524K": 524 * 1024, "1M": 1024 * 1024}
V3 = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168, intermediate_size=18432,
          moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, kv_lora_rank=512,
          q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=8,
          num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=3,
          max_position_embeddings=1 << 20)
GQA = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=8192, intermediate_size=28672,
           num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=1 << 20)
# a small V4 (and the dense Llama of the same hidden size, layers and heads) for step times
SMALL_V4 = dict(vocab_size=1024, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=8, head_dim=128, q_lora_rank=128, o_groups=2, o_lora_rank=128,
                n_routed_experts=8, num_experts_per_tok=2,
                layer_types=["heavily_compressed_attention", "compressed_sparse_attention"] * 2,
                compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
                mlp_layer_types=["hash_moe", "moe", "moe", "moe"], sliding_window=128, index_n_heads=8,
                index_head_dim=64, index_topk=128, hc_mult=4, max_position_embeddings=40000,
                bos_token_id=1, eos_token_id=2)


def v4_flash() -> dict:
    from transformers import DeepseekV4Config

    raw = DeepseekV4Config(n_routed_experts=8, num_experts_per_tok=2).to_dict()  # experts hold no KV
    raw["architectures"] = ["DeepseekV4ForCausalLM"]
    return raw


def engine_config(raw: dict, tp: int = 1, dcp: int = 1, max_len: int = 1 << 20):
    from dist_engine.config import (
        CacheConfig,
        EngineConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
    )

    m = ModelConfig.from_dict(raw, raw["architectures"][0])
    return EngineConfig(model=m, dtype="bfloat16", cache=CacheConfig(block_size=max(16, m.min_block_size)),
                        scheduler=SchedulerConfig(max_model_len=max_len, max_num_seqs=1),
                        parallel=ParallelConfig(tensor_parallel_size=tp, decode_context_parallel_size=dcp))


def kinds_of(config) -> list:
    """Every layer's cache kinds, from the model built on the meta device (no memory)."""
    from dist_engine.distributed.comm import NullCommunicator
    from dist_engine.models import model_class
    from dist_engine.worker.caches import layer_kinds

    m = config.model
    with torch.device("meta"):
        model = model_class(m.architecture)(m, NullCommunicator(), torch.bfloat16, 4096)
    return [k for layer in model.model.layers for k in layer_kinds(layer, torch.bfloat16, m.sliding_window)]


def per_sequence_bytes(config, kinds: list, context: int) -> dict:
    """One sequence of ``context`` tokens on one rank: each paged group's blocks (the primary
    grows with the context; a window group holds what ``plan_layout`` reserves per sequence)
    plus the recurrent state."""
    from dist_engine.kv_cache.kinds import (
        bytes_per_block,
        group_window,
        paged_groups,
        state_bytes_per_seq,
    )

    bs, look = config.cache.block_size, config.scheduler.num_lookahead_slots
    per_block = bytes_per_block(kinds, bs)
    out = {}
    for g in paged_groups(kinds):
        w = group_window(g)
        blocks = -(-context // bs) if w is None else -(-(w + look) // bs) + 2
        out[g] = blocks * per_block[g]
    out["state"] = state_bytes_per_seq(kinds)
    return out


def kv_table() -> dict:
    res = {}
    for name, raw in (("DeepSeek-V4-Flash", v4_flash()), ("DeepSeek-V3 (MLA)", V3), ("Llama-3.1-70B (GQA)", GQA)):
        config = engine_config(raw)
        kinds = kinds_of(config)
        rows = {}
        for label, n in CONTEXTS.items():
            parts = per_sequence_bytes(config, kinds, n)
            rows[label] = {"bytes_per_token": sum(parts.values()) / n, "GiB_per_sequence": sum(parts.values()) / GIB,
                           "parts_bytes": parts}
        res[name] = rows
    v4 = res["DeepSeek-V4-Flash"]
    for name in list(res)[1:]:
        res[name]["vs_v4"] = {c: res[name][c]["bytes_per_token"] / v4[c]["bytes_per_token"] for c in CONTEXTS}
    return res


def longest_context(budget: int) -> dict:
    """The longest context of one sequence at ``budget`` KV bytes per rank (the start-up log's
    figure: primary blocks x block size x sequence shards)."""
    from dist_engine.worker.caches import plan_layout

    res = {}
    for label, tp, dcp in (("DCP=1 (TP=1)", 1, 1), ("DCP=2 (TP=2)", 2, 2)):
        config = engine_config(v4_flash(), tp, dcp, max_len=1 << 20)
        layout = plan_layout(kinds_of(config), config, budget)
        res[label] = layout.num_blocks * config.cache.block_size * config.parallel.num_kv_shards
    res["ratio"] = res["DCP=2 (TP=2)"] / res["DCP=1 (TP=1)"]
    return res


def write_small(tmp: str, kind: str, **save) -> str:
    """The small V4 (random, constants randomised) or the dense Llama of its size."""
    path = os.path.join(tmp, kind + "".join(f"-{k}" for k in save))
    if os.path.isdir(path):
        return path
    if kind == "v4":
        from v4_checkpoints import random_v4, save_v4

        return save_v4(random_v4(0, **SMALL_V4), path, **save)
    import transformers

    s = SMALL_V4
    cfg = transformers.LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                                   intermediate_size=s["moe_intermediate_size"] * (s["num_experts_per_tok"] + 1),
                                   num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                                   num_key_value_heads=1, head_dim=s["head_dim"],
                                   max_position_embeddings=s["max_position_embeddings"], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.06)
    model.save_pretrained(path)
    return path


def check_allocated(tmp: str) -> dict:
    """The accounting against a real engine: each group's bytes per block x its blocks, and the
    state slots, equal the bytes the small V4 engine allocated."""
    from dist_engine import LLM

    with LLM(write_small(tmp, "v4"), skip_tokenizer_init=True, speculative="none", max_model_len=4096,
             kv_cache_memory="64MiB", max_num_seqs=4) as llm:
        info, layout = llm.engine.cache_info, llm.engine.layout
    want = {g: info["bytes_per_block_by_group"][g] * layout.group_blocks(g) for g in info["bytes_per_block_by_group"]}
    want["state"] = info["state_bytes_per_seq"] * layout.num_state_tensors
    return {"accounted": want, "allocated": info["allocated_bytes"], "equal": want == info["allocated_bytes"]}


def step_times(tmp: str, contexts: list[int]) -> dict:
    from dist_engine import LLM, SamplingParams

    res = {}
    sp = SamplingParams(temperature=0, max_tokens=33, ignore_eos=True)
    for kind in ("v4", "dense"):
        with LLM(write_small(tmp, kind), skip_tokenizer_init=True, speculative="none", max_model_len=max(contexts) + 64,
                 max_num_batched_tokens=2048, kv_cache_memory="512MiB", enable_prefix_caching=False,
                 max_num_seqs=1) as llm:
            g = torch.Generator().manual_seed(1)
            for n in contexts:
                ids = [1] + torch.randint(3, 1024, (n - 1,), generator=g).tolist()
                m = llm.generate(prompt_token_ids=[ids], sampling_params=sp)[0].metrics
                step = statistics.median(m.inter_token_latencies)  # robust to the shared machine's spikes
                res.setdefault(kind, {})[n] = {"decode_step_ms": 1e3 * step,
                                              "prefill_s": m.first_token_time - m.first_scheduled_time}
                print(kind, n, f"{1e3 * step:.1f} ms/step", flush=True)
    res["dense_over_v4"] = {n: res["dense"][n]["decode_step_ms"] / res["v4"][n]["decode_step_ms"] for n in contexts}
    return res


def resident(tmp: str) -> dict:
    from dist_engine import LLM

    res = {}
    cases = {"bf16": (write_small(tmp, "v4"), "bfloat16"),
             "FP8 + FP8 experts": (write_small(tmp, "v4", naming="released", fp8_block=128), "bfloat16"),
             "FP8 + MXFP4 experts": (write_small(tmp, "v4", naming="released", fp8_block=128, fp4_experts=True),
                                     "bfloat16")}
    for name, (path, dtype) in cases.items():
        with LLM(path, dtype=dtype, skip_tokenizer_init=True, speculative="none", max_model_len=256,
                 num_kv_blocks=8) as llm:
            info = llm.engine.cache_info
        res[name] = {"weight_bytes": info["weight_bytes"],
                     "by_format": {k[len("weight_bytes["):-1]: v for k, v in info.items() if k.startswith("weight_bytes[")}}
    base = res["bf16"]["weight_bytes"]
    for name in res:
        res[name]["vs_bf16"] = res[name]["weight_bytes"] / base
    return res


def report(res: dict) -> str:
    lines = ["# DeepSeek-V4: cache and weights as the engine accounts for them", "",
             f"`{res['command']}` on {res['machine']}", "",
             "## KV bytes per token, one sequence, bf16, one rank", "",
             "| model | " + " | ".join(CONTEXTS) + " | GiB at 1M |", "|---|" + "---|" * (len(CONTEXTS) + 1)]
    for name, rows in res["kv"].items():
        cells = [f"{rows[c]['bytes_per_token']:,.0f}" + (f" ({rows['vs_v4'][c]:.1f}x V4)" if "vs_v4" in rows else "")
                 for c in CONTEXTS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rows['1M']['GiB_per_sequence']:.2f} |")
    v4 = res["kv"]["DeepSeek-V4-Flash"]["1M"]["parts_bytes"]
    lines += ["", "V4-Flash at 1M by group: " + ", ".join(f"{g} {b / GIB:.3f} GiB" for g, b in v4.items()), "",
              f"Accounting vs allocated on a small V4 engine: equal = {res['allocated']['equal']} "
              f"({json.dumps(res['allocated']['allocated'])})", "",
              f"## Longest context at {res['budget_gib']} GiB of KV per rank (V4-Flash, bf16)", "",
              "| layout | tokens |", "|---|---|"]
    lc = res["longest"]
    lines += [f"| {k} | {v:,} |" for k, v in lc.items() if k != "ratio"] + ["", f"DCP=2 / DCP=1: {lc['ratio']:.2f}x"]
    if "steps" in res:
        st = res["steps"]
        lines += ["", "## Decode step time (ms, median of 32 steps) vs context, small shape, fp32, CPU", "",
                  "| context | V4 (window 128, ratios 4/128, top-128) | dense attention | dense / V4 |", "|---|---|---|---|"]
        for n in st["v4"]:
            lines.append(f"| {n} | {st['v4'][n]['decode_step_ms']:.1f} | {st['dense'][n]['decode_step_ms']:.1f} | "
                         f"{st['dense_over_v4'][n]:.2f}x |")
    if "resident" in res:
        lines += ["", "## Resident weight bytes, small V4 shape", "", "| weights | bytes | vs bf16 | by format |",
                  "|---|---|---|---|"]
        for name, r in res["resident"].items():
            fmt = ", ".join(f"{k} {v:,}" for k, v in r["by_format"].items())
            lines.append(f"| {name} | {r['weight_bytes']:,} | {r['vs_bf16']:.2f} | {fmt} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,2048,4096,8192")
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--quick", action="store_true", help="accounting only (no engine runs)")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args()
    res = {"command": "python bench/bench_deepseek_v4.py " + " ".join(sys.argv[1:]), "machine": f"{os.cpu_count()} CPU cores",
           "budget_gib": a.budget_gib}
    res["kv"] = kv_table()
    res["longest"] = longest_context(int(a.budget_gib * GIB))
    with tempfile.TemporaryDirectory() as tmp:
        res["allocated"] = check_allocated(tmp)
        if not a.quick:
            res["resident"] = resident(tmp)
            res["steps"] = step_times(tmp, [int(c) for c in a.contexts.split(",")])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "deepseek_v4.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    with open(os.path.join(a.out, "deepseek_v4.md"), "w") as f:
        f.write(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
