"""The quantized CPU products (kernels/qlinear.c) against dequantize + F.linear in double
precision, row by row independent of the batch; the layout's own round trip; TP slicing of
groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_engine.kernels import qlinear
from dist_engine.quant.groups import E2M1_DOUBLED, INT4_SIGNED, GroupQuant, ShardError, quantize

pytestmark = pytest.mark.skipif(not qlinear.available(), reason="no C compiler for the kernels")

# (kind, table, offsets, group): every code path of the kernel
CASES = [
    ("u4", None, True, 32),     # Q4_1 / AWQ / asymmetric GPTQ
    ("u4", "int4", False, 64),  # Q4_0 / symmetric int4 (codes -8..7 through a table)
    ("u4", "e2m1", False, 16),  # NVFP4 (MXFP4: groups of 32)
    ("s8", None, False, 32),    # Q8_0 / int8
    ("s8", None, True, 16),     # Q6_K-like groups of 16, with offsets (Q5_K)
    ("e4m3", None, False, 128), # FP8 block / per-channel
]
TABLES = {"int4": INT4_SIGNED, "e2m1": E2M1_DOUBLED}


def make(kind: str, table: str | None, offsets: bool, group: int, n: int = 200, k: int = 256,
         fp16_scales: bool = False, seed: int = 0) -> GroupQuant:
    g = torch.Generator().manual_seed(seed)
    if kind == "u4":
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    elif kind == "s8":
        codes = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
    else:
        codes = (torch.randn(n, k, generator=g) * 3).to(torch.float8_e4m3fn).view(torch.uint8)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    offs = torch.randn(n, k // group, generator=g) * 0.05 if offsets else None
    if fp16_scales:
        scales, offs = scales.half().float(), None if offs is None else offs.half().float()
    lut = torch.tensor(TABLES[table], dtype=torch.int8) if table else None
    return GroupQuant(codes, scales, offs, kind, lut, "test")


def reference(gq: GroupQuant, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp64 product of the values the codes stand for, computed independently of the packer."""
    w = gq.values().double().view(gq.shape[0], -1, gq.group) * gq.scales.double().unsqueeze(-1)
    if gq.offsets is not None:
        w = w + gq.offsets.double().unsqueeze(-1)
    return F.linear(x.double(), w.view(gq.shape), None if bias is None else bias.double())


@pytest.mark.parametrize("float_codes", [False, True], ids=["default", "float-codes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'off' if c[2] else 'sym'}-g{c[3]}")
def test_product_matches_dequantized_reference_and_ignores_the_batch(case, dtype, float_codes):
    """The default path (on VNNI CPUs: digits for u4 / s8, tests/test_quant_digits.py) and
    codes as floats, which the others and FP8 take."""
    gq = make(*case)
    qw = gq.pack()
    x = torch.randn(64, gq.shape[1]).to(dtype)
    bias = torch.randn(gq.shape[0]).to(dtype)
    y = qlinear.linear(x, qw, bias, float_codes=float_codes)
    ref = reference(gq, x.float(), bias.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output is rounded to bf16
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
    alone = torch.cat([qlinear.linear(x[i:i + 1], qw, bias, float_codes=float_codes) for i in range(64)])
    assert torch.equal(alone, y)  # every row's result is the same alone or in a batch
    for m in (2, 3, 4, 5, 17):  # the tile shapes of the kernels
        assert torch.equal(qlinear.linear(x[:m], qw, bias, float_codes=float_codes), y[:m])


@pytest.mark.skipif(not qlinear.has_int8_activations(), reason="no AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "e4m3"],
                         ids=lambda c: f"{c[0]}-{c[1]}-{'off' if c[2] else 'sym'}-g{c[3]}")
def test_int8_activations_equal_an_exact_product_of_quantized_rows(case):
    """int8 activations: each row quantized per 32 inputs (scale max|x| / 127, round half to
    even), then the exact product of the quantized row with the weights, offsets included; the
    kernel may differ from it only by fp32 rounding of the per-group partial sums."""
    gq = make(*case)
    qw = gq.pack()
    x = torch.randn(64, gq.shape[1], generator=torch.Generator().manual_seed(1))
    y = qlinear.linear(x, qw, int8_activations=True)
    amax = x.view(64, -1, 32).abs().amax(-1, keepdim=True)
    # an IEEE division, as the kernel's (torch's 127 / tensor multiplies by a reciprocal, an ulp
    # away at times, which moves an x * inv of k + 0.5 to the other side of the tie)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(x.view(64, -1, 32) * inv)  # torch.round: half to even, as lrintf
    ref = reference(gq, (codes.double() * (amax / 127).double()).view(64, -1))
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    alone = torch.cat([qlinear.linear(x[i:i + 1], qw, int8_activations=True) for i in range(64)])
    assert torch.equal(alone, y)


def test_packing_round_trips_and_keeps_fp16_scales_in_two_bytes():
    for case in CASES:
        gq = make(*case, fp16_scales=True, n=37)  # a partial last panel
        qw = gq.pack()
        assert qw.scales.dtype == torch.float16  # exact in fp16: stored in two bytes
        assert torch.equal(qlinear.dequantize(qw), gq.dequantize())
        rows = torch.tensor([0, 16, 36, 5])
        assert torch.equal(qlinear.dequantize_rows(qw, rows), gq.dequantize()[rows])
        assert torch.equal(qlinear.gather_rows(qw, rows), gq.dequantize()[rows])  # other devices
        x = torch.randn(3, gq.shape[1])
        ref = reference(gq, x)
        assert ((qlinear.linear(x, qw).double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert make("u4", None, True, 32).pack().scales.dtype == torch.float32  # not exact in fp16


def test_stacked_parts_of_different_formats_are_promoted_exactly():
    """q/k/v of one layer in different formats (GGUF files mix Q4_K and Q6_K) share one
    weight: codes widened to bytes, groups split, offsets added as zeros."""
    parts = [make("u4", None, True, 32, n=48, seed=1), make("s8", None, False, 16, n=16, seed=2),
             make("u4", "int4", False, 64, n=32, seed=3)]
    stacked = GroupQuant.cat(parts)
    assert (stacked.kind, stacked.group) == ("s8", 16)
    assert torch.equal(stacked.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_tensor_parallel_slices_keep_whole_groups():
    gq = make("u4", None, True, 32, n=16, k=256)
    part = gq.cols(64, 192)
    assert part.shape == (16, 128) and torch.equal(part.dequantize(), gq.dequantize()[:, 64:192])
    per_channel = GroupQuant(gq.codes, gq.scales[:, :1], None, "u4")
    assert per_channel.cols(96, 200).group == 104  # inside one group: the slice is the group
    with pytest.raises(ShardError, match="cuts its groups of 32"):
        gq.cols(0, 48)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False)])
def test_round_to_nearest_quantization_error_is_bounded(bits, symmetric):
    w = torch.randn(96, 256) * 0.05
    gq = quantize(w, bits, 32, symmetric)
    g = w.view(96, 8, 32)
    err = (gq.dequantize() - w).abs().view(96, 8, 32).amax(-1)
    if bits == 8:  # half a step of max|w| / 127
        bound = g.abs().amax(-1) / 127 / 2
    elif symmetric:  # the largest magnitude maps to -8, so the opposite end may clamp at +7
        bound = g.abs().amax(-1) / 8
    else:  # half a step of (max - min) / 15
        bound = (g.amax(-1) - g.amin(-1)) / 15 / 2
    assert (err <= bound * 1.05 + 1e-6).all()  # scales rounded to fp16 add a little
