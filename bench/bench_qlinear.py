"""The quantized CPU products (dist_engine/kernels/qlinear.*) on the default model's shapes: the
three ways to take activations, side by side in one run.

    python bench/bench_qlinear.py [--rounds 50] [--threads N] [--engine]

- float: codes turned into floats, fp32 FMAs (the default before the digit path; still the
  path for FP8 codes and CPUs without AVX-512 VNNI);
- digits: each activation as three base-256 digits per 32 inputs, exact integer products
  (vpdpbusd), fp32-class (the default for 4- and 8-bit codes on VNNI CPUs);
- int8: activations rounded to int8 per 32 inputs (``--int8-activations``, llama.cpp's Q8_0
  arithmetic).

Weights: random codes in the default model's formats and shapes (SmolLM2-135M: q/k/v, o,
gate/up, down), Q8_0 (int8 codes, fp16 scale per 32) and Q4_1 (4-bit codes, fp16 scale and
minimum per 32). Two workloads at batch 1 and 4 (the paths take turns within every round, best
round kept): "layer", one layer's four products called again and again (their 2-4 MB of
weights stay in cache: the arithmetic alone), and "model", the 30 layers' products with 30
different weights and the tied Q8_0 head (96-143 MB: what a decode step streams from DRAM).
Each path's error against the dequantized weights' product in double precision (max
|y - ref| / max |ref| over 64 random rows).
``--engine`` adds the whole engine on the default model's GGUF files (Q8_0: llama.cpp's
requantization of the shipped Q4_1, needs llama-cpp-python), float activations both ways in one
process: the C decoder's products and the head switched between digits and codes as floats,
taking turns: batch-1 decode tok/s (128 greedy tokens, best of the rounds), whether the greedy
tokens agree, and perplexity on bench_quant's fixed text.
Writes bench/results/qlinear.{json,md}. On a shared machine compare ratios within one run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time

import torch
import torch.nn.functional as F

from dist_engine.kernels import qlinear
from dist_engine.quant.groups import GroupQuant

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
H, KV, MLP, VOCAB = 576, 192, 1536, 49152  # SmolLM2-135M: hidden, k/v width, MLP width, vocabulary
LAYER = [(H + 2 * KV, H), (H, H), (2 * MLP, H), (H, MLP)]  # [out, in]: qkv, o, gate_up, down
HEAD = (VOCAB, H)
PATHS = {"float": "_float", "digits": "", "int8": "_i8"}


def make(fmt: str, n: int, k: int, seed: int = 0) -> GroupQuant:
    g = torch.Generator().manual_seed(seed)
    if fmt == "Q8_0":
        codes, offsets = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8), None
    else:
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        offsets = (-8 * torch.rand(n, k // 32, generator=g) * 0.01).half().float()
    scales = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).half().float()
    return GroupQuant(codes, scales, offsets, "s8" if fmt == "Q8_0" else "u4", None, fmt)


def timed(fns: dict, rounds: int, calls: int = 10) -> dict:
    """Best seconds per call of each function (``calls`` calls a round), the functions taking
    turns (order flipped every round)."""
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            best[name] = min(best[name], (time.perf_counter() - t) / calls)
    return best


def speed(weights: list, rows: int, rounds: int, calls: int) -> dict:
    lib, threads = qlinear._lib(), torch.get_num_threads()
    xs = [torch.randn(rows, w.in_features) for w in weights]
    ys = [torch.empty(rows, w.out_features) for w in weights]

    def call(suffix: str):
        fn = getattr(lib, "qlinear_f32" + suffix)  # the C entry point, without Python's checks

        def run() -> None:
            for w, x, y in zip(weights, xs, ys):
                fn(x.data_ptr(), x.stride(0), ctypes.byref(w.struct), None, y.data_ptr(), rows, threads)
        return run

    return timed({path: call(suffix) for path, suffix in PATHS.items()}, rounds, calls)


def precision(fmt: str, n: int, k: int) -> dict:
    gq = make(fmt, n, k)
    qw = gq.pack()
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x.double(), gq.dequantize().double())
    out = {}
    for path in PATHS:
        y = qlinear.linear(x, qw, float_codes=path == "float", int8_activations=path == "int8")
        out[path] = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    return out


class FloatCodes:
    """Switches an engine's quantized products between the default (digits) and codes as floats:
    a second C decoder whose products are qlinear_f32_float, and the Python path's products
    (the head, and everything the decoder does not run) called with float_codes."""

    def __init__(self, llm) -> None:
        import functools

        from dist_engine.kernels import decoder

        self.inner = llm.engine.executor.worker.runner.model.model
        self.digits, self.linear = self.inner.cpu_decoder, qlinear.linear
        self.float_linear = functools.partial(qlinear.linear, float_codes=True)
        self.float = None  # no C decoder (the Python path runs every product)
        if self.digits is not None:
            fns = dict(decoder._functions(self.digits.dtype))
            fns["quant"] = ctypes.cast(getattr(qlinear._lib(), f"qlinear_{decoder.SUFFIX[self.digits.dtype]}_float"),
                                       ctypes.c_void_p).value
            blocks, keep = list(self.inner.layers), []
            self.float = decoder.CPUDecoder(blocks, [decoder._layer(b, self.digits.dtype, fns, keep) for b in blocks],
                                            keep, fns, self.digits.dtype)

    def set(self, float_codes: bool) -> None:
        self.inner.cpu_decoder = self.float if float_codes else self.digits
        qlinear.linear = self.float_linear if float_codes else self.linear


def engine(tokens: int, rounds: int) -> dict:
    import tempfile

    from bench_quant import HERE as QHERE
    from bench_quant import PROMPT, WINDOW, llamacpp_files
    from transformers import AutoTokenizer

    from dist_engine.weights.registry import DEFAULT_MODEL, fetch_gguf, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    ids = list(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"])
    text = open(os.path.join(QHERE, "assets", "perplexity_text.txt")).read()
    toks = tok(text, add_special_tokens=False)["input_ids"]
    windows = [[tok.bos_token_id or 1] + toks[i:i + WINDOW - 1]
               for i in range(0, len(toks) - WINDOW // 2, WINDOW - 1)]
    shipped = fetch_gguf(DEFAULT_MODEL)
    files = {"GGUF Q4_1": shipped}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            files["GGUF Q8_0"] = llamacpp_files(shipped, tmp)["Q8_0"]
        except ImportError:
            print("llama-cpp-python is not installed: no Q8_0 file, the Q4_1 row only")
        return {name: engine_row(name, path, ids, windows, tokens, rounds) for name, path in files.items()}


def engine_row(name: str, path: str, ids: list[int], windows: list, tokens: int, rounds: int) -> dict:
    import math

    from bench_quant import Ours

    from dist_engine import SamplingParams

    e = Ours(model=path, speculative="none")
    switch = FloatCodes(e.llm)
    greedy = {}

    def decode(float_codes: bool) -> None:
        switch.set(float_codes)
        r = e.llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
            temperature=0, max_tokens=tokens, ignore_eos=True))
        greedy[float_codes] = r[0].outputs[0].token_ids

    try:
        decode(False), decode(True)  # warm-up
        best = timed({"digits": lambda: decode(False), "float": lambda: decode(True)}, rounds, calls=1)
        ppl = {}
        for key, float_codes in (("digits", False), ("float", True)):
            switch.set(float_codes)
            ppl[key] = math.exp(sum(e.nll(w) for w in windows) / sum(len(w) - 1 for w in windows))
    finally:
        switch.set(False)
        e.close()
    same = next((i for i, (a, b) in enumerate(zip(greedy[False], greedy[True])) if a != b), tokens)
    print(f"{name}: decode digits {tokens / best['digits']:.1f} tok/s, float codes {tokens / best['float']:.1f} "
          f"({best['float'] / best['digits']:.2f}x); perplexity {ppl['digits']:.5f} / {ppl['float']:.5f}; "
          f"greedy tokens equal for {same} of {tokens}", flush=True)
    return {"tok_s": {k: tokens / v for k, v in best.items()}, "perplexity": ppl, "greedy_tokens_equal": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="default: torch's")
    ap.add_argument("--engine", action="store_true", help="also the engine, both ways (see the top)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--engine-rounds", type=int, default=3)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not qlinear.has_int8_activations():
        raise SystemExit("this CPU has no AVX-512 VNNI: only the float path runs here")
    rows = []
    for fmt in ("Q8_0", "Q4_1"):
        layer = [make(fmt, n, k, seed=i).pack() for i, (n, k) in enumerate(LAYER)]
        model = [make(fmt, n, k, seed=i).pack() for i, (n, k) in enumerate(LAYER * 30)]
        model.append(make("Q8_0", *HEAD).pack())  # the tied embedding is Q8_0 in both files
        for part, weights, calls in (("layer", layer, 10), ("model", model, 1)):
            for m in (1, 4):
                t = speed(weights, m, a.rounds, calls)
                rows.append({"format": fmt, "part": part, "rows": m, "us": {p: s * 1e6 for p, s in t.items()}})
                print(f"{fmt} {part} batch {m}: " + ", ".join(
                    f"{p} {s * 1e6:.0f} us ({t['float'] / s:.2f}x)" for p, s in t.items()), flush=True)
        del model
    err = {fmt: precision(fmt, 3 * H, MLP if fmt == "Q8_0" else H) for fmt in ("Q8_0", "Q4_1")}
    for fmt, e in err.items():
        print(f"{fmt} max error / max |y|: " + ", ".join(f"{p} {v:.2e}" for p, v in e.items()))
    eng = engine(a.tokens, a.engine_rounds) if a.engine else {}
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": a.rounds,
            "date": time.strftime("%Y-%m-%d"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    with open(os.path.join(RESULTS, "qlinear.json"), "w") as f:
        json.dump({"meta": meta, "speed": rows, "error": err, "engine": eng}, f, indent=1)
    lines = [f"Quantized products, default model shapes, {meta['threads']} threads, {meta['date']} "
             f"(OMP_WAIT_POLICY={meta['omp_wait_policy'] or 'unset'}); best of {a.rounds} rounds, "
             "paths taking turns\n",
             "| weights | products | batch | float us | digits us | int8 us | digits vs float | int8 vs float |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        us = r["us"]
        lines.append(f"| {r['format']} | {r['part']} | {r['rows']} | {us['float']:.0f} | {us['digits']:.0f} | "
                     f"{us['int8']:.0f} | {us['float'] / us['digits']:.2f}x | {us['float'] / us['int8']:.2f}x |")
    lines += ["\nError against the dequantized product in double (max |y - ref| / max |ref|, 64 rows):\n",
              "| weights | float | digits | int8 |", "|---|---|---|---|"]
    lines += [f"| {fmt} | {e['float']:.1e} | {e['digits']:.1e} | {e['int8']:.1e} |" for fmt, e in err.items()]
    if eng:
        lines += [f"\nThe engine, batch-1 decode ({a.tokens} greedy tokens, best of {a.engine_rounds} rounds taking "
                  "turns) and perplexity, float activations both ways in one process:\n",
                  "| weights | digits tok/s | codes as floats tok/s | digits vs floats | perplexity, digits / floats "
                  "| greedy tokens equal |", "|---|---|---|---|---|---|"]
        for name, r in eng.items():
            t, p = r["tok_s"], r["perplexity"]
            lines.append(f"| {name} | {t['digits']:.1f} | {t['float']:.1f} | {t['digits'] / t['float']:.2f}x | "
                         f"{p['digits']:.5f} / {p['float']:.5f} | {r['greedy_tokens_equal']} of {a.tokens} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "qlinear.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
