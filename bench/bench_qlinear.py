"""The quantized CPU products (dist_engine/kernels/qlinear.*) on the default model's shapes: the
three ways to take activations, side by side in one run.

    python bench/bench_qlinear.py [--rounds 15] [--threads N]

- float: codes turned into floats, fp32 FMAs (the default before the digit path; still the
  path for FP8 codes and CPUs without AVX-512 VNNI);
- digits: each activation as three base-256 digits per 32 inputs, exact integer products
  (vpdpbusd), fp32-class (the default for 4- and 8-bit codes on VNNI CPUs);
- int8: activations rounded to int8 per 32 inputs (``--int8-activations``, llama.cpp's Q8_0
  arithmetic).

Weights: random codes in the default model's formats and shapes (SmolLM2-135M: q/k/v, o,
gate/up, down of one layer, and the tied Q8_0 head), Q8_0 (int8 codes, fp16 scale per 32) and
Q4_1 (4-bit codes, fp16 scale and minimum per 32). Time per call at batch 1 and 4 (the paths
take turns within every round, best round kept), and each path's error against the dequantized
weights' product in double precision (max |y - ref| / max |ref| over 64 random rows).
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
HEAD = [(VOCAB, H)]
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


def timed(fns: dict, rounds: int) -> dict:
    """Best seconds per call of each function, the functions taking turns (order flipped
    every round)."""
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            for _ in range(10):
                fns[name]()
            best[name] = min(best[name], (time.perf_counter() - t) / 10)
    return best


def speed(fmt: str, shapes: list, rows: int, rounds: int) -> dict:
    lib, threads = qlinear._lib(), torch.get_num_threads()
    ws = [make(fmt, n, k, seed=i).pack() for i, (n, k) in enumerate(shapes)]
    xs = [torch.randn(rows, k) for _, k in shapes]
    ys = [torch.empty(rows, n) for n, _ in shapes]

    def call(suffix: str):
        fn = getattr(lib, "qlinear_f32" + suffix)  # the C entry point, without Python's checks

        def run() -> None:
            for w, x, y in zip(ws, xs, ys):
                fn(x.data_ptr(), x.stride(0), ctypes.byref(w.struct), None, y.data_ptr(), rows, threads)
        return run

    return timed({path: call(suffix) for path, suffix in PATHS.items()}, rounds)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="default: torch's")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not qlinear.has_int8_activations():
        raise SystemExit("this CPU has no AVX-512 VNNI: only the float path runs here")
    rows = []
    for fmt in ("Q8_0", "Q4_1"):
        for part, shapes in (("layer", LAYER), ("head", HEAD)):
            if part == "head" and fmt == "Q4_1":
                continue  # the model's head is Q8_0 in both files
            for m in (1, 4):
                t = speed(fmt, shapes, m, a.rounds)
                rows.append({"format": fmt, "part": part, "rows": m, "us": {p: s * 1e6 for p, s in t.items()}})
                print(f"{fmt} {part} batch {m}: " + ", ".join(
                    f"{p} {s * 1e6:.0f} us ({t['float'] / s:.2f}x)" for p, s in t.items()), flush=True)
    err = {fmt: precision(fmt, 3 * H, MLP if fmt == "Q8_0" else H) for fmt in ("Q8_0", "Q4_1")}
    for fmt, e in err.items():
        print(f"{fmt} max error / max |y|: " + ", ".join(f"{p} {v:.2e}" for p, v in e.items()))
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": a.rounds,
            "date": time.strftime("%Y-%m-%d"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    with open(os.path.join(RESULTS, "qlinear.json"), "w") as f:
        json.dump({"meta": meta, "speed": rows, "error": err}, f, indent=1)
    lines = [f"Quantized products, default model shapes, {meta['threads']} threads, {meta['date']} "
             f"(OMP_WAIT_POLICY={meta['omp_wait_policy'] or 'unset'}); best of {a.rounds} rounds, "
             "paths taking turns\n",
             "| weights | product | batch | float us | digits us | int8 us | digits vs float | int8 vs float |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        us = r["us"]
        lines.append(f"| {r['format']} | {r['part']} | {r['rows']} | {us['float']:.0f} | {us['digits']:.0f} | "
                     f"{us['int8']:.0f} | {us['float'] / us['digits']:.2f}x | {us['float'] / us['int8']:.2f}x |")
    lines += ["\nError against the dequantized product in double (max |y - ref| / max |ref|, 64 rows):\n",
              "| weights | float | digits | int8 |", "|---|---|---|---|"]
    lines += [f"| {fmt} | {e['float']:.1e} | {e['digits']:.1e} | {e['int8']:.1e} |" for fmt, e in err.items()]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "qlinear.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
