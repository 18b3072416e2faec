"""Hybrid Gated DeltaNet model (Qwen3.5-like) against a Llama of the same hidden size, on CPU.

    python bench/bench_hybrid.py [--contexts 1024,4096,8192] [--tokens 16]

Random weights written by transformers. Hybrid: hidden 1024, 4 layers (3 Gated DeltaNet : 1
gated full attention), attention heads 8 / 2 KV of dim 256, linear heads 16 key / 16 value of
dim 128, MLP 3584, vocabulary 32000, one MTP layer (``mtp.*``). Llama: hidden 1024, 4 layers,
heads 8 / 2 KV of dim 128, MLP 3584, vocabulary 32000. (Qwen3.5 0.8B has 24 such layers; 4 keep
a run on 2 shared cores within minutes, and the ratios per layer are what carries over.)

1. Decode tok/s at each context (batch 1, greedy; both engines up at once, the models and
   contexts decoded in turn, best of ``--rounds``), ours and, at the first context, transformers' (its PyTorch fallback for the
   delta rule and conv) on the same weights.
2. Cache bytes: the hybrid's recurrent state per sequence, its KV per token, the Llama's KV
   per token.
3. A K=3 MTP step against a plain step (the random MTP layer's drafts are rejected, so the
   step cost is what speculation adds before any acceptance pays it back).
4. Prefix caching: TTFT of a prompt sharing 2048 tokens with an earlier one, against the
   earlier one's (the hybrid resumes from the state checkpoint at 2048).
5. Rollback of rejected drafts in one Gated DeltaNet layer, K=3 verification of 1 and 8
   sequences: keeping each token's state during verification (what the engine does) against
   saving the state before it and recomputing the accepted tokens afterwards.

Results: bench/results/hybrid.{json,md}. 2 shared CPU cores: absolute figures are noisy,
ratios within one run are what to read.
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

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]
COMMON = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=None)
HYBRID = dict(COMMON, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
              linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4)
LLAMA = dict(COMMON, head_dim=128)


def make_models(root: str, **shrink) -> dict[str, str]:
    """The two checkpoints (``shrink``: config fields changed in both, for a dry run)."""
    import transformers

    from conftest import make_qwen3_5

    hybrid = make_qwen3_5("qwen3_5", os.path.join(root, "hybrid"), **{**HYBRID, **shrink})
    torch.manual_seed(0)
    llama_cfg = transformers.LlamaConfig(**{k: v for k, v in {**LLAMA, **shrink}.items() if not k.startswith("linear_")})
    llama = transformers.AutoModelForCausalLM.from_config(llama_cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.08 if p.dim() > 1 else 0.2)
    llama.save_pretrained(os.path.join(root, "llama"), safe_serialization=True)
    return {"hybrid": hybrid, "llama": os.path.join(root, "llama")}


def prompt(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [1] + [r.randrange(3, 32000) for _ in range(n - 1)]


def engine(path: str, max_len: int, **kw):
    from dist_engine import LLM

    return LLM(path, skip_tokenizer_init=True, max_model_len=max_len, kv_cache_memory="768MiB",
               max_num_seqs=4, cpu_threads=1, **kw)


def run(llm, tokens: list[int], n: int):
    from dist_engine import SamplingParams

    out = llm.generate(prompt_token_ids=[tokens], sampling_params=SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True))[0]
    return out.outputs[0].token_ids, out.metrics


def engine_part(paths: dict[str, str], contexts: list[int], n: int, rounds: int) -> dict:
    """Per model: decode tok/s per context, cache bytes, and the TTFT of a 2048-token shared
    prefix. Both engines are up at once: each context's prompt is prefilled once (``ctx``
    tokens cached, the state checkpointed at ``ctx``), then decoded ``rounds`` times, the
    models and contexts taking turns, each time recomputing only its last token; the best
    round is the one least disturbed by whatever else shares the cores."""
    base = prompt(max(contexts) + 1, 1)
    res = {name: {"decode_tok_s": {}, "decode_rounds": {}, "ttft_s": {}} for name in paths}
    llms = {name: engine(path, max(*contexts, 2048 + 32) + n + 64, speculative="none")
            for name, path in paths.items()}
    try:
        for name, llm in llms.items():
            run(llm, prompt(64, 2), 4)  # warm-up
            for ctx in contexts:
                res[name]["ttft_s"][ctx] = run(llm, base[:ctx + 1], 1)[1].time_to_first_token
        for _ in range(rounds):
            for ctx in contexts:
                for name, llm in llms.items():
                    tokens, m = run(llm, base[:ctx + 1], n)
                    r = res[name]
                    r.setdefault("decode_hit_tokens", {})[ctx] = m.prefix_hit_tokens  # ctx: 1 recomputed
                    r["decode_rounds"].setdefault(ctx, []).append(1.0 / m.time_per_output_token)
                    r.setdefault("tokens", {})[ctx] = tokens
        for name, llm in llms.items():
            r = res[name]
            for ctx in contexts:
                r["decode_tok_s"][ctx] = max(r["decode_rounds"][ctx])
                print(name, ctx, [f"{v:.1f}" for v in r["decode_rounds"][ctx]], flush=True)
            shared = prompt(2048, 3)
            cold = run(llm, shared + prompt(33, 4)[1:], 1)[1]
            warm = run(llm, shared + prompt(33, 5)[1:], 1)[1]
            r["prefix"] = {"cold_ttft_s": cold.time_to_first_token, "warm_ttft_s": warm.time_to_first_token,
                           "hit_tokens": warm.prefix_hit_tokens}
            info = llm.engine.cache_info
            r["kv_bytes_per_token"] = info["bytes_per_block"] // info["block_size"]
            r["state_bytes_per_seq"] = info.get("state_bytes_per_seq", 0)
    finally:
        for llm in llms.values():
            llm.shutdown()
    return res


def mtp_step_cost(path: str, ctx: int, n: int, plain_tok_s: float) -> dict:
    spec = dict(method="mtp", num_speculative_tokens=3, min_draft_acceptance=0.0, max_draft_tokens_per_step=0)
    with engine(path, ctx + n + 64, speculative_config=spec) as llm:
        run(llm, prompt(64, 2), 4)
        before = llm.engine.spec_stats.num_steps
        _, m = run(llm, prompt(ctx, 1), n)
        steps = llm.engine.spec_stats.num_steps - before
    tok_s = 1.0 / m.time_per_output_token
    accepted_length = (n - 1) / max(steps, 1)
    # time of a K=3 step over a plain step: (tokens per step / K=3 tok/s) / (1 / plain tok/s)
    return {"k3_tok_s": tok_s, "mean_accepted_length": accepted_length,
            "step_cost_vs_plain": accepted_length * plain_tok_s / tok_s}


def transformers_decode(path: str, ctx: int, n: int, device: str = "cpu", dtype=torch.float32) -> float:
    """transformers' decode tok/s after a ``ctx``-token prompt (its own cache, batch 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    with torch.inference_mode():
        ids = [t % model.config.vocab_size for t in prompt(ctx, 1)]
        out = model(torch.tensor([ids], device=device), use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)


def timed(fn, reps: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6  # microseconds


def rollback(path: str, batch: int) -> dict:
    """One Gated DeltaNet layer, a verification of 1 + 3 drafts for ``batch`` sequences; then
    the state after 1 accepted token (all drafts rejected: the usual case at low acceptance) or
    after 3. Kept: the verification keeps every token's state and the rollback copies one.
    Recompute: the state is saved before the verification, restored after it, and the
    accepted tokens run through the conv and the delta rule again from the layer's projected
    inputs (kept from the verification: the cheapest recompute; rerunning the projections too
    costs a whole layer step more). Times of the layer's core (conv, delta rule, state reads
    and writes) and, for scale, of the whole layer step (projections, norm included)."""
    from dist_engine.layers.gated_delta import gated_delta
    from dist_engine.layers.state_cache import LayerState
    from dist_engine.worker.batch import build_batch
    from dist_engine.worker.messages import SeqWork
    from qwen3_5_harness import BLOCK, load_ours, table

    layer = load_ours(path).model.layers[0].linear_attn
    h, vn = layer.heads, layer.heads.value_heads
    state = LayerState.empty(layer.cache_kind, 2 * batch, torch.device("cpu"))
    for t in state.tensors.values():
        t.normal_(0.0, 0.1)

    def meta(n: int, keep: bool):
        works = tuple(SeqWork(i, (5,) * n, 300, table(i), True, num_drafts=n - 1, state_slot=i)
                      for i in range(batch))
        m = build_batch(works, BLOCK, [None], 4, torch.float32, torch.device("cpu")).meta
        m.state.keep_per_token = keep
        return m

    x = torch.randn(4 * batch, HYBRID["hidden_size"])  # [4B, H]: sequence i's tokens at rows 4i..4i+3
    slots, saved = torch.arange(batch), torch.arange(batch, 2 * batch)
    res = {}
    with torch.inference_mode():
        mixed, _, b, a = layer.in_proj(x).split([h.conv_channels, vn * h.value_dim, vn, vn], dim=-1)
        beta = torch.sigmoid(b).float()
        g = -layer.A_log.float().exp() * torch.nn.functional.softplus(a.float() + layer.dt_bias.float())

        def core(m, rows=slice(None)):
            return gated_delta(mixed[rows], g[rows], beta[rows], layer.conv1d.weight, h, state, m.state, layer.layer)

        m_keep, m_plain = meta(4, True), meta(4, False)
        res["layer_step_us"] = timed(lambda: layer(x, state, m_plain))
        res["verify_keep_us"] = timed(lambda: core(m_keep))
        res["verify_plain_us"] = timed(lambda: core(m_plain))
        kept = m_keep.state.kept[layer.layer]

        def restore_kept(j: int) -> None:
            for name, t in state.tensors.items():
                t.index_copy_(0, slots, kept[name][:, j])

        res["restore_kept_us"] = timed(lambda: restore_kept(0))
        res["save_restore_us"] = timed(lambda: (state.copy_slots(saved, slots), state.copy_slots(slots, saved)))
        res["kept_total_us"] = res["verify_keep_us"] + res["restore_kept_us"]
        for n in (1, 3):
            rows = torch.tensor([4 * i + j for i in range(batch) for j in range(n)])
            m_n = meta(n, False)
            res[f"rerun_{n}_us"] = timed(lambda m=m_n, r=rows: core(m, r))
            res[f"recompute_total_{n}_us"] = res["verify_plain_us"] + res["save_restore_us"] + res[f"rerun_{n}_us"]
    return res


def report(r: dict, contexts: list[int]) -> str:
    h, ll = r["hybrid"], r["llama"]
    lines = ["| context | hybrid decode tok/s | Llama decode tok/s | hybrid / Llama |", "|---|---|---|---|"]
    for c in contexts:
        a, b = h["decode_tok_s"][c], ll["decode_tok_s"][c]
        lines.append(f"| {c} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    c0, c1 = contexts[0], contexts[-1]
    lines += ["", f"Decode speed kept from {c0} to {c1} tokens: hybrid {h['decode_tok_s'][c1] / h['decode_tok_s'][c0]:.2f}, "
              f"Llama {ll['decode_tok_s'][c1] / ll['decode_tok_s'][c0]:.2f}.",
              f"transformers at {c0}: hybrid {r['hf_hybrid_tok_s']:.1f} tok/s (ours {h['decode_tok_s'][c0] / r['hf_hybrid_tok_s']:.2f}x), "
              f"Llama {r['hf_llama_tok_s']:.1f} tok/s (ours {ll['decode_tok_s'][c0] / r['hf_llama_tok_s']:.2f}x).", "",
              f"Cache (float32): hybrid state {h['state_bytes_per_seq'] / 2**20:.2f} MiB per sequence = "
              f"{h['state_bytes_per_seq'] // h['kv_bytes_per_token']} tokens of its KV ({h['kv_bytes_per_token']} B/token, "
              f"1 attention layer in 4); Llama {ll['kv_bytes_per_token']} B/token. At {c1} tokens: hybrid "
              f"{(h['state_bytes_per_seq'] + c1 * h['kv_bytes_per_token']) / 2**20:.1f} MiB, Llama "
              f"{c1 * ll['kv_bytes_per_token'] / 2**20:.1f} MiB per sequence.", ""]
    m = r["mtp"]
    lines += [f"K=3 MTP step at {c0} tokens: {m['step_cost_vs_plain']:.2f}x a plain step's time (mean accepted "
              f"length {m['mean_accepted_length']:.2f}, random MTP layer), {m['k3_tok_s']:.1f} tok/s.", ""]
    for name, x in (("hybrid", h), ("Llama", ll)):
        p = x["prefix"]
        lines.append(f"Prefix cache, 2048 shared tokens + 32 own, {name}: TTFT {p['cold_ttft_s'] * 1e3:.0f} ms cold, "
                     f"{p['warm_ttft_s'] * 1e3:.0f} ms warm ({p['cold_ttft_s'] / p['warm_ttft_s']:.1f}x cut, "
                     f"{p['hit_tokens']} tokens hit).")
    lines += ["", "Rollback of rejected drafts in one Gated DeltaNet layer, K=3 verification, microseconds per "
              "step (the layer's core: conv, delta rule, state I/O; the whole layer step for scale):", "",
              "| batch | layer step | verify keeping states + restore one | verify plain + save/restore + rerun 1 / 3 "
              "accepted | recompute / kept (1 / 3 accepted) |", "|---|---|---|---|---|"]
    for b, x in r["rollback"].items():
        k = x["kept_total_us"]
        lines.append(f"| {b} | {x['layer_step_us']:.0f} | {x['verify_keep_us']:.0f} + {x['restore_kept_us']:.0f} = {k:.0f} | "
                     f"{x['verify_plain_us']:.0f} + {x['save_restore_us']:.0f} + {x['rerun_1_us']:.0f} / "
                     f"{x['rerun_3_us']:.0f} = {x['recompute_total_1_us']:.0f} / {x['recompute_total_3_us']:.0f} | "
                     f"{x['recompute_total_1_us'] / k:.2f}x / {x['recompute_total_3_us'] / k:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    torch.set_num_threads(1)  # the cores are shared: a second thread spins against other work
    paths = make_models(tempfile.mkdtemp(prefix="hybrid-bench-"))
    r = {"config": {"hybrid": HYBRID, "llama": LLAMA}, "contexts": contexts, "tokens": a.tokens}
    r.update(engine_part(paths, contexts, a.tokens, a.rounds))
    r["mtp"] = mtp_step_cost(paths["hybrid"], contexts[0], a.tokens, r["hybrid"]["decode_tok_s"][contexts[0]])
    r["hf_hybrid_tok_s"] = transformers_decode(paths["hybrid"], contexts[0], a.tokens)
    r["hf_llama_tok_s"] = transformers_decode(paths["llama"], contexts[0], a.tokens)
    r["rollback"] = {b: rollback(paths["hybrid"], b) for b in (1, 8)}
    text = report(r, contexts)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "hybrid.json"), "w") as f:
        json.dump(r, f, indent=2)
    with open(os.path.join(RESULTS, "hybrid.md"), "w") as f:
        f.write(f"# Hybrid (Qwen3.5-like) vs Llama, CPU\n\n`python bench/bench_hybrid.py --contexts {a.contexts} --tokens {a.tokens} --rounds {a.rounds}`\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
