"""Routed experts paged under a budget (``--expert-cache-memory``) on a MoE several times larger
than the budget: peak resident memory, tok/s, hit rate and bytes read per token at budgets of
25%, 50% and 100% of the experts, against the same model with every expert resident; prefetch
on vs off, LFU vs LRU; and ``--quantization int4`` all resident vs a 25% budget (int4 slots:
the same bytes hold ~3.5x the experts; each miss reads the bf16 expert and quantizes it).
A row's ratios are against the all-resident run of its own weights (bf16 or int4).

    python bench/bench_expert_cache.py [--tokens 48] [--root DIR] [--quick] [--only NAME,NAME]

The model: a random Qwen3-MoE shape, bfloat16 (hidden 1024, 24 layers of 64 experts, 6 per
token, moe_intermediate 512: 1536 experts of 3 MiB = 4.5 GiB of experts, ~4.8 GB on disk),
written once under ``--root`` (default ``$TMPDIR/dist_engine_bench``). Random weights route
uniformly and change the residual stream completely from layer to layer, which no trained MoE
does, so the checkpoint gives routing two properties of trained models by construction, stated
here because every hit rate below depends on them: (1) token embeddings of RMS 1 and residual
updates of about a tenth of that per layer (adjacent layers see similar hidden states, which
is what next-layer prefetch relies on), and (2) experts of unequal popularity: every embedding
shares a common direction u, and each router row has a component along u that falls off with
the expert's rank (a per-layer random order), so a few experts take a large share of the
routes, as measured in trained MoEs.

Every configuration runs in its own process (``tests/expert_memory_probe.py``: RssAnon and
RssFile sampled every 2 ms while generating) with the checkpoint dropped from the page cache
first, so each reads from disk. Results: bench/results/expert_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RESULTS = os.path.join(ROOT, "bench", "results")
PROBE = os.path.join(ROOT, "tests", "expert_memory_probe.py")
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
             num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             num_experts=64, num_experts_per_tok=6, norm_topk_prob=True, max_position_embeddings=4096,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
QUICK = dict(SHAPE, num_hidden_layers=4, num_experts=16, hidden_size=512, moe_intermediate_size=256,
             num_attention_heads=8, num_key_value_heads=2)
UPDATE_STD = 0.1  # residual update per layer relative to the embedding's RMS (see the docstring)


def make_checkpoint(path: str, shape: dict, seed: int = 0) -> str:
    """Write the random checkpoint at ``path`` one layer per file (never all of it in memory)."""
    import transformers
    from safetensors.torch import save_file

    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return path
    os.makedirs(path, exist_ok=True)
    transformers.Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], **shape).save_pretrained(path)
    H, L, E = shape["hidden_size"], shape["num_hidden_layers"], shape["num_experts"]
    inter, D = shape["moe_intermediate_size"], shape["head_dim"]
    Hq, Hk, V = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16

    def rand(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(*size, generator=g) * std).to(bf)

    u = torch.randn(H, generator=g)
    u /= u.norm()
    weight_map = {}

    def save(tensors: dict, name: str) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, name))
        weight_map.update({k: name for k in tensors})

    emb = torch.randn(V, H, generator=g) + 0.5 * H ** 0.5 * u  # RMS ~1.1, a shared direction u
    save({"model.embed_tokens.weight": emb.to(bf), "model.norm.weight": torch.ones(H, dtype=bf),
          "lm_head.weight": rand(V, H, std=H ** -0.5)}, "embed.safetensors")
    # an update of RMS ~UPDATE_STD from inputs of RMS ~1: each output row sums `fan_in` products
    out_std = lambda fan_in: UPDATE_STD / fan_in ** 0.5  # noqa: E731
    popularity = 0.1 * torch.log(E / torch.arange(1, E + 1).float()) / torch.log(torch.tensor(float(E)))
    for i in range(L):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=bf),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=bf),
             p + "self_attn.q_proj.weight": rand(Hq * D, H, std=H ** -0.5),
             p + "self_attn.k_proj.weight": rand(Hk * D, H, std=H ** -0.5),
             p + "self_attn.v_proj.weight": rand(Hk * D, H, std=H ** -0.5),
             p + "self_attn.o_proj.weight": rand(H, Hq * D, std=out_std(Hq * D)),
             p + "self_attn.q_norm.weight": torch.ones(D, dtype=bf),
             p + "self_attn.k_norm.weight": torch.ones(D, dtype=bf)}
        order = torch.randperm(E, generator=g)  # which expert is how popular, per layer
        gate = torch.randn(E, H, generator=g) * 0.02 + popularity[order][:, None] * u
        t[p + "mlp.gate.weight"] = gate.to(bf)
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t[q + "gate_proj.weight"] = rand(inter, H, std=H ** -0.5)
            t[q + "up_proj.weight"] = rand(inter, H, std=H ** -0.5)
            t[q + "down_proj.weight"] = rand(H, inter, std=out_std(inter))
        save(t, f"layer-{i:03d}.safetensors")
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def drop_page_cache(path: str) -> None:
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def probe(path: str, tokens: int, budget: int | None, policy: str = "lfu", prefetch: bool = True,
          quantization: str | None = None) -> dict:
    drop_page_cache(path)
    args = [sys.executable, PROBE, path, "--tokens", str(tokens), "--prompts", "1", "--dtype", "bfloat16",
            "--prompt-len", "32", "--policy", policy] + (["--quantization", quantization] if quantization else [])
    if budget is not None:
        args += ["--budget", str(budget)] + ([] if prefetch else ["--no-prefetch"])
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-4000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def row(name: str, r: dict, resident: dict | None, experts_bytes: int) -> dict:
    s = r["expert_cache"] or {}
    n = len(r["tokens"][0])
    out = {"config": name, "decode_tok_s": r["decode_tok_s"], "e2e_tok_s": n / r["generate_s"],
           "ttft_s": r["ttft_s"], "peak_rss_anon_mib": r["peak_rss_anon"] / 2**20,
           "peak_rss_file_mib": r["peak_rss_file"] / 2**20, "load_s": r["load_s"],
           "hit_rate": s.get("hit_rate"), "mib_read_per_token": s.get("bytes_per_token", 0) / 2**20,
           "prefetches": s.get("prefetches"), "prefetch_hits": s.get("prefetch_hits"),
           "wait_s": s.get("wait_s"), "resident_expert_mib": s.get("num_slots", 0) * s.get("expert_bytes", 0) / 2**20,
           "experts_page_cached_mib": r["expert_bytes_page_cached"] / 2**20}
    if resident is not None:
        out["tok_s_vs_resident"] = out["decode_tok_s"] / resident["decode_tok_s"]
        out["rss_anon_vs_resident"] = r["peak_rss_anon"] / resident["peak_rss_anon"]
        out["same_tokens_as_resident"] = r["tokens"] == resident["tokens"]
    return out


def report(rows: list[dict], meta: dict) -> str:
    cols = ["config", "decode_tok_s", "tok_s_vs_resident", "ttft_s", "peak_rss_anon_mib", "rss_anon_vs_resident",
            "resident_expert_mib", "hit_rate", "mib_read_per_token", "prefetches", "prefetch_hits", "wait_s",
            "experts_page_cached_mib", "same_tokens_as_resident"]
    lines = [f"# Expert cache ({meta['date']})", "",
             f"Model: {meta['shape']}; experts {meta['experts_gib']:.2f} GiB; batch 1, "
             f"{meta['prompt_len']}-token prompt, {meta['tokens']} greedy tokens, bf16, {meta['threads']} "
             "threads. Each row in its own process, checkpoint dropped from the page cache first.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "dist_engine_bench"))
    ap.add_argument("--quick", action="store_true", help="a small model, for a dry run")
    ap.add_argument("--only", default=None, help="comma-separated configurations to run (results then go to "
                    "expert_cache_<last word of the last one>.{json,md}), e.g. 'all resident int4,25%% lfu prefetch int4'")
    a = ap.parse_args()
    shape = QUICK if a.quick else SHAPE
    path = make_checkpoint(os.path.join(a.root, "moe-quick" if a.quick else "moe-4.5g"), shape)
    E, L = shape["num_experts"], shape["num_hidden_layers"]
    expert = 3 * shape["hidden_size"] * shape["moe_intermediate_size"] * 2  # bf16 panels
    experts_bytes = E * L * expert
    staging = 2 * expert  # the loader's dense copy and read buffer
    budget = lambda frac: int(frac * experts_bytes) + staging  # noqa: E731
    runs = [("all resident", None, "lfu", True),
            ("25% lfu prefetch", budget(0.25), "lfu", True), ("25% lfu no prefetch", budget(0.25), "lfu", False),
            ("25% lru prefetch", budget(0.25), "lru", True),
            ("50% lfu prefetch", budget(0.5), "lfu", True), ("50% lfu no prefetch", budget(0.5), "lfu", False),
            ("50% lru prefetch", budget(0.5), "lru", True),
            ("100% lfu prefetch", budget(1.0), "lfu", True),
            # --quantization int4 (per load): the same bytes of budget hold ~3.5x the experts
            ("all resident int4", None, "lfu", True), ("25% lfu prefetch int4", budget(0.25), "lfu", True)]
    if a.only:
        keep = a.only.split(",")
        runs = [r for r in runs if r[0] in keep]
    results, rows = {}, []
    for name, b, policy, prefetch in runs:
        print(f"{name} ...", flush=True)
        quant = "int4" if name.endswith("int4") else None
        results[name] = probe(path, a.tokens, b, policy, prefetch, quant)
        base = results.get("all resident int4" if quant else "all resident")
        rows.append(row(name, results[name], base, experts_bytes))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "shape": shape, "experts_gib": experts_bytes / 2**30,
            "tokens": a.tokens, "prompt_len": 32, "threads": torch.get_num_threads()}
    os.makedirs(RESULTS, exist_ok=True)
    name = "expert_cache_quick" if a.quick else "expert_cache"
    if a.only:
        name += "_" + runs[-1][0].split()[-1].replace("%", "")
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(report(rows, meta))
    print(report(rows, meta))


if __name__ == "__main__":
    main()
