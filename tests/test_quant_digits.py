"""The digit path of the quantized CPU products (kernels/qlinear_int.c): float activations as
three base-256 digits per 32 inputs against 4- and 8-bit codes. It is the default on VNNI CPUs,
so it must keep what the float path gives: fp32-class results, each row independent of the
batch, and outputs that move by ~1e-7 when the inputs do (no rounding steps, unlike int8
activations), which is what keeps greedy output identical across decode, verification and
prefix-cache hits."""

from __future__ import annotations

import pytest
import torch
from test_quant_kernels import make, reference

from dist_engine.kernels import qlinear

pytestmark = pytest.mark.skipif(not (qlinear.available() and qlinear.has_int8_activations()),
                                reason="no C compiler or no AVX-512 VNNI on this CPU")

DIGITS_MAX = 127 * (65536 + 256 + 1)  # the largest |v| three balanced digits hold
# (kind, table, offsets, group): every code form the digit path takes
CASES = [
    ("s8", None, False, 32),     # Q8_0 / int8 at load
    ("s8", None, True, 16),      # Q5_K / Q6_K-like groups of 16 with offsets
    ("s8", None, False, 128),    # per-128 int8 (GPTQ 8-bit)
    ("u4", None, True, 32),      # Q4_1 / int4 at load / AWQ
    ("u4", None, False, 64),     # plain 0..15 codes, no offsets
    ("u4", None, True, 128),     # asymmetric GPTQ, groups of 128
    ("u4", "int4", False, 64),   # Q4_0 / symmetric int4 through a table
    ("u4", "e2m1", False, 16),   # NVFP4
    ("u4", "e2m1", True, 32),    # a table with offsets
]


def represented(x: torch.Tensor) -> torch.Tensor:
    """The inputs the digit path multiplies, in double: per 32 inputs the power of two 2^t
    with max|x| / 2^t <= DIGITS_MAX and above half of it (2^t >= 2^-149), x / 2^t rounded half
    to even."""
    xb = x.double().view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    mant, e = torch.frexp(amax)  # amax = mant 2^e, mant in [0.5, 1)
    t = (e - 23 + (mant * 2.0 ** 23 > DIGITS_MAX).int()).clamp(min=-149).double()
    v = torch.round(xb * torch.pow(2.0, -t))
    assert v.abs().max() <= DIGITS_MAX
    return (v * torch.pow(2.0, t)).view(x.shape)


def max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'off' if c[2] else 'sym'}-g{c[3]}")
def test_digits_are_an_exact_product_of_24_bit_inputs_and_ignore_the_batch(case, dtype):
    gq = make(*case)
    qw = gq.pack()
    assert qlinear.digits_apply(qw)
    x = torch.randn(64, gq.shape[1], generator=torch.Generator().manual_seed(2)).to(dtype)
    bias = torch.randn(gq.shape[0]).to(dtype)
    y = qlinear.linear(x, qw, bias)
    xr = represented(x.float())
    assert (xr - x.double()).abs().max() <= x.double().abs().max() * 2.0 ** -23
    if dtype == torch.float32:
        # the exact product of the represented inputs, to fp32 rounding of the per-block sums
        assert max_rel(y, reference(gq, xr, bias.float())) < 4e-7
        # against the true inputs no worse than codes as floats (same order: both ~2e-7)
        exact = reference(gq, x, bias)
        assert max_rel(y, exact) < 2 * max_rel(qlinear.linear(x, qw, bias, float_codes=True), exact) + 1e-7
    else:  # outputs rounded to bf16
        assert max_rel(y, reference(gq, x.float(), bias.float())) < 1e-2
    alone = torch.cat([qlinear.linear(x[i:i + 1], qw, bias) for i in range(64)])
    assert torch.equal(alone, y)  # bitwise: a row's result never depends on its neighbours
    for m in (2, 3, 4, 5, 17):  # every tile shape
        assert torch.equal(qlinear.linear(x[:m], qw, bias), y[:m])


@pytest.mark.parametrize("kind", ["s8", "u4"])
def test_digits_move_with_the_inputs_where_int8_activations_jump(kind):
    """x and x moved by a relative 1e-7 (about an ulp, what differs between a decode step and
    a verification step): the digit path's outputs move by ~1e-7 relative like the float
    path's. int8 activations move by a whole rounding step where an input sits on a boundary."""
    gq = make(kind, None, kind == "u4", 32)
    qw = gq.pack()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, gq.shape[1], generator=g)
    moved = x * (1 + 1e-7 * torch.randn(x.shape, generator=g))
    # input 1 just below an int8 rounding boundary (3.5 steps of its block), moved just above
    step = torch.cat([x[:, :1], x[:, 2:32]], 1).abs().amax(1) / 127
    x[:, 1], moved[:, 1] = step * 3.5, step * 3.5
    for _ in range(4):  # 4 ulps each way
        x[:, 1] = torch.nextafter(x[:, 1], torch.zeros_like(step))
        moved[:, 1] = torch.nextafter(moved[:, 1], step * 4)

    def change(**kw) -> float:
        return max_rel(qlinear.linear(moved, qw, **kw), qlinear.linear(x, qw, **kw).double())

    assert change() < 1e-6
    assert change(float_codes=True) < 1e-6
    assert change(int8_activations=True) > 1e-4  # a code flipped: the test can tell


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["s8", "u4-off"])
def test_digits_keep_zero_huge_tiny_and_non_finite_rows_apart(case):
    gq = make(*case)
    qw = gq.pack()
    K = gq.shape[1]
    x = torch.randn(8, K, generator=torch.Generator().manual_seed(4))
    x[1] = 0.0
    x[2, 5] = float("inf")
    x[3, 70] = float("nan")
    x[4, :32] *= 1e-30  # one block 40 orders of magnitude below the next
    x[5, 32:] = 0.0  # zero blocks beside a non-zero one
    y = qlinear.linear(x, qw)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert y[2].isnan().all() and y[3].isnan().all()
    ok = torch.tensor([0, 4, 5, 6, 7])
    assert torch.equal(qlinear.linear(x[ok], qw), y[ok])  # the non-finite rows touch no other
    assert max_rel(y[ok], reference(gq, represented(x[ok]))) < 4e-7
    # a row scaled by 2^k gives exactly the result scaled by 2^k (no bias)
    for k in (-100, -60, 60, 100):
        assert torch.equal(qlinear.linear(x[ok] * 2.0 ** k, qw), y[ok] * 2.0 ** k)
    # subnormal inputs: v = x 2^149 exactly; the results are about as tiny
    tiny = x[ok] * 2.0 ** -135
    ref = reference(gq, tiny)
    assert ((qlinear.linear(tiny, qw).double() - ref).abs() <= 1e-6 * ref.abs().max() + 2.0 ** -140).all()
