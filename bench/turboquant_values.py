"""Value rows of the default model as TurboQuant stores them (rotated, Lloyd-Max codes, the norm
kept) against per-row uniform min-max codes (fp16 scale and offset, as vLLM stores values),
unrotated and rotated: mean squared error relative to the row's squared norm, 4 and 3 bits.

    python bench/turboquant_values.py     # -> bench/results/turboquant_values.md

The rows: every layer's V after a 256-token English passage (the second window of
tests/test_turboquant_default_model.py), read from an exact fp32 cache.
"""

from __future__ import annotations

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def uniform(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x ``[N, H, D]`` through per-row min-max codes 0 .. 2^bits - 1 (fp16 step and offset)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = ((hi - lo) / (2 ** bits - 1)).half().float().clamp_min(1e-12)
    lo = lo.half().float()
    return ((x - lo) / step).round().clamp(0, 2 ** bits - 1) * step + lo


def main() -> None:
    from test_turboquant_default_model import english_windows, run_format
    from transformers import AutoTokenizer

    from dist_engine.layers import turboquant as tq
    from dist_engine.weights.registry import DEFAULT_MODEL, resolve_model

    rows = run_format("float32", english_windows(AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))))["rows"]
    lines = [f"# Value rows of the default model: TurboQuant vs uniform codes ({time.strftime('%Y-%m-%d')})", "",
             "| bits | TurboQuant (bytes/row, error) | uniform | uniform after the rotation |", "|---|---|---|---|"]
    for bits in (4, 3):
        spec = tq.TQSpec(bits, rows[0][1].shape[-1])
        err: dict[str, list[torch.Tensor]] = {"tq": [], "uniform": [], "rotated": []}
        for layer, (_, v) in enumerate(rows):
            x = v.float()  # [256, Hk, D]
            rot = tq.rotations(spec.dim, layer, range(x.shape[1]))
            n2 = (x ** 2).sum(-1)
            codes, scales = tq.encode(x, rot, spec)
            y = torch.einsum("hed,nhd->nhe", rot, x)
            for name, got, ref in (("tq", tq.dequantize(codes, scales, rot, spec), x),
                                   ("uniform", uniform(x, bits), x), ("rotated", uniform(y, bits), y)):
                err[name].append((((got - ref) ** 2).sum(-1) / n2).mean())
        e = {k: float(torch.stack(v).mean()) for k, v in err.items()}
        lines.append(f"| {bits} | {spec.bytes_per_row} B, {e['tq']:.4f} | {spec.row_bytes + 4} B, {e['uniform']:.4f} | "
                     f"{spec.row_bytes + 4} B, {e['rotated']:.4f} |")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "turboquant_values.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
