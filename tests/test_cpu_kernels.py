"""The C kernels (dist_engine/kernels): Gumbel noise for sampling, decode / verification
attention over block tables, RMSNorm, dense products and a layer's fused element-wise steps.

The noise equals its numpy fallback and has Gumbel(0, 1) moments. The attention is checked
against a direct softmax attention written here (GQA, several query tokens per sequence,
sliding windows, contexts spanning several key chunks, fp32 and bf16, head sizes with and
without the vector path), against transformers through the model, and the engine's greedy
output with the kernel switched on and off. RMSNorm is checked against its PyTorch path, the
products against ``F.linear`` in double precision, each row also computed alone; the fused
steps against the PyTorch operators they replace.
"""

from __future__ import annotations

import pytest
import torch
from test_parity import PROMPT, hf_logits, our_logits

from conftest import hf_greedy
from dist_engine import LLM, SamplingParams
from dist_engine.kernels import paged_attention as pk
from dist_engine.worker.messages import SeqWork

# (context length, query tokens): decode, verification, a lone key, and contexts over several
# 256-key chunks (the kernel's split), one ending exactly on a chunk boundary
SEQS = [(150, 1), (17, 1), (1, 1), (64, 4), (200, 16), (33, 3), (700, 4), (513, 1), (256, 2)]


def reference(q, k_cache, v_cache, seqs, starts, block_size, window, scale):
    out = torch.zeros(q.shape, dtype=torch.float32)
    G = q.shape[1] // k_cache.shape[1]
    for s, st in zip(seqs, starts):
        Q, L = len(s.token_ids), s.context_len
        slots = torch.tensor([s.block_table[j // block_size] * block_size + j % block_size for j in range(L)])
        k = k_cache[slots].float().repeat_interleave(G, dim=1)  # [L, Hq, D]
        v = v_cache[slots].float().repeat_interleave(G, dim=1)
        for i in range(Q):
            pos = L - Q + i
            keys = torch.arange(L)
            visible = (keys <= pos) & ((keys > pos - window) if window else True)
            scores = torch.einsum("hd,lhd->hl", q[st + i].float(), k) * scale
            scores[:, ~visible] = float("-inf")
            out[st + i] = torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v)
    return out


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((4, 4), 24)], ids=["gqa-d64", "mha-d24"])
@pytest.mark.parametrize("window", [None, 20, 300])
def test_kernel_matches_reference(dtype, atol, heads, head_dim, window):
    assert pk.available(dtype), "the C kernel did not build (see the log for the compiler error)"
    gen = torch.Generator().manual_seed(0)
    Hq, Hk = heads
    block_size, slots = 16, 4096
    k_cache = torch.randn(slots, Hk, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(slots, Hk, head_dim, generator=gen).to(dtype)
    free = torch.randperm(slots // block_size, generator=gen).tolist()  # scattered blocks
    seqs, starts, T = [], [], 0
    for ctx, Q in SEQS:
        n = (ctx + block_size - 1) // block_size
        seqs.append(SeqWork(0, (0,) * Q, ctx - Q, tuple(free[:n]), True))
        free = free[n:]
        starts.append(T)
        T += Q
    # q as attention gets it: a view into a wider [T, Hq + Hk, D] tensor (rows strided)
    q = torch.randn(T, Hq + Hk, head_dim, generator=gen).to(dtype)[:, :Hq]
    group = pk.make_group(seqs, starts, block_size, window, T)
    out = torch.full((T, Hq, head_dim), float("nan"), dtype=dtype)
    pk.attend(q, k_cache, v_cache, group, 0.125, out)
    ref = reference(q, k_cache, v_cache, seqs, starts, block_size, window, 0.125)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


def test_kernel_result_does_not_depend_on_the_batch():
    """A sequence's rows are bitwise the same alone and among others."""
    assert pk.available(torch.float32)
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(2048, 2, 32, generator=gen) for _ in range(2))
    seqs = [SeqWork(0, (0,), 299, tuple(range(i * 20, i * 20 + 19)), True) for i in range(4)]
    q = torch.randn(4, 6, 32, generator=gen)
    together = torch.empty(4, 6, 32)
    pk.attend(q, k_cache, v_cache, pk.make_group(seqs, [0, 1, 2, 3], 16, None, 4), 0.2, together)
    for i, s in enumerate(seqs):
        alone = torch.empty(1, 6, 32)
        pk.attend(q[i:i + 1], k_cache, v_cache, pk.make_group([s], [0], 16, None, 1), 0.2, alone)
        assert torch.equal(alone[0], together[i])
    # short sequences (one key chunk) with 3 queries: alone, a sequence's KV heads split over
    # the threads; among others they do not
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seqs = [SeqWork(0, (0, 0, 0), 117, tuple(range(i * 20, i * 20 + 8)), True) for i in range(4)]
        q = torch.randn(12, 6, 32, generator=gen)
        together = torch.empty(12, 6, 32)
        pk.attend(q, k_cache, v_cache, pk.make_group(seqs, [0, 3, 6, 9], 16, None, 12), 0.2, together)
        for i, s in enumerate(seqs):
            alone = torch.empty(3, 6, 32)
            pk.attend(q[3 * i:3 * i + 3], k_cache, v_cache, pk.make_group([s], [0], 16, None, 3),
                      0.2, alone)
            assert torch.equal(alone, together[3 * i:3 * i + 3])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["llama", "llama1kv", "mistral", "qwen3"])
def test_paged_kernel_logits_match_transformers(tiny_models, arch):
    """Decode and verification-sized chunks through the kernel, a long chunk through PyTorch's
    (mistral's window of 12 is crossed)."""
    assert pk.available(torch.float32)
    path = tiny_models(arch)
    ours = our_logits(path, PROMPT, [3, 1, 1, 4, 1, 1, 8, 1], paged=True)
    torch.testing.assert_close(ours, hf_logits(path, PROMPT), atol=1e-4, rtol=0)


def test_engine_greedy_same_with_and_without_kernel(tiny_models):
    path = tiny_models("llama")
    prompts = [PROMPT, [1, 5, 6], PROMPT[:11], [1, 300]]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with LLM(path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64, block_size=4) as llm:
        runner = llm.engine.executor.worker.runner
        assert runner.use_paged_kernel
        outs = {}
        for flag in (True, False):
            runner.use_paged_kernel = flag
            res = llm.generate(prompt_token_ids=prompts, sampling_params=params)
            outs[flag] = [r.outputs[0].token_ids for r in res]
    assert outs[True] == outs[False]
    assert outs[True][0] == hf_greedy(path, PROMPT, 20)


def test_gumbel_noise_kernel_equals_numpy_fallback_and_is_gumbel():
    from dist_engine.kernels import gumbel

    assert gumbel._kernel(), "the C kernel did not build (see the log for the compiler error)"
    keys = [0, 1, 12345, 2**63 - 1]
    fast = gumbel.noise_rows(keys, 50_000)
    slow = gumbel.noise_rows(keys, 50_000, use_kernel=False)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)  # a last-bit log rounding at most
    assert fast.isfinite().all()
    # one row alone equals its row in a batch; rows with different keys differ
    assert torch.equal(gumbel.noise_rows(keys[2:3], 50_000)[0], fast[2])
    assert not torch.equal(fast[0], fast[1])
    x = fast.double().flatten()  # 200k draws: Gumbel mean 0.5772 (Euler's), variance pi^2 / 6
    assert abs(x.mean().item() - 0.5772157) < 0.01
    assert abs(x.var().item() - 1.6449341) < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_kernel_matches_the_pytorch_path(dtype):
    from dist_engine.kernels.rms_norm import rms_norm
    from dist_engine.layers.norm import RMSNorm

    norm = RMSNorm(96, 1e-5, dtype)
    norm.weight.data = (torch.randn(96, generator=torch.Generator().manual_seed(0)) + 1).to(dtype)
    gen = torch.Generator().manual_seed(1)
    for x in (torch.randn(1, 96, generator=gen), torch.randn(40, 96, generator=gen),  # rows
              torch.randn(5, 3, 96, generator=gen),  # heads (qk_norm)
              torch.randn(7, 200, generator=gen)[:, 10:106]):  # a strided view
        x = x.to(dtype)
        assert rms_norm(x, norm.weight, norm.eps) is not None
        norm.use_kernel = True
        fast = norm(x)
        norm.use_kernel = False
        slow = norm(x)
        assert fast.shape == x.shape
        torch.testing.assert_close(fast, slow, atol=1e-6 if dtype == torch.float32 else 8e-3,
                                   rtol=1e-6 if dtype == torch.float32 else 0)
    assert rms_norm(torch.randn(4, 8, 96)[:, ::2], norm.weight.float(), 1e-5) is None  # no view


def test_without_a_compiler_the_pytorch_path_is_used(monkeypatch, tmp_path):
    from dist_engine import kernels

    monkeypatch.setenv("DIST_ENGINE_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernels.load.cache_clear()
    try:
        assert kernels.load("paged_attention") is None
        monkeypatch.delenv("CC")
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        monkeypatch.setenv("DIST_ENGINE_CACHE", str(blocker / "cache"))  # cannot be created
        kernels.load.cache_clear()
        assert kernels.load("paged_attention") is None
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        kernels.load.cache_clear()
        assert kernels.load("paged_attention") is None
    finally:
        kernels.load.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_kernel_matches_pytorch_and_ignores_the_batch(dtype):
    """Row counts across the 6-row tile and the 240-row block, outputs not a multiple of the
    16-row panel (123: a lone row takes panels four at a time, the partial one among them),
    bias or none, a strided input; every row bitwise equal computed alone."""
    from dist_engine.kernels import linear as cl

    gen = torch.Generator().manual_seed(2)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.01)
    for out in (83, 123):
        w = (torch.randn(out, 72, generator=gen) * 0.1).to(dtype)
        b = torch.randn(out, generator=gen).to(dtype)
        packed = cl.pack(w)
        assert packed is not None, "the C kernel did not build (see the log for the compiler error)"
        assert packed.panels.shape == ((out + 15) // 16, 72, 16)
        for rows in (1, 2, 3, 4, 5, 6, 7, 13, 250):
            x = torch.randn(rows, 90, generator=gen).to(dtype)[:, 9:81]  # rows strided
            for bias in (None, b):
                y = cl.linear(x, packed, bias)
                ref = torch.nn.functional.linear(x.double(), w.double(),
                                                 None if bias is None else bias.double())
                torch.testing.assert_close(y.double(), ref, **tol)
                for i in {0, rows // 2, rows - 1}:
                    assert torch.equal(cl.linear(x[i:i + 1], packed, bias)[0], y[i])
    with pytest.raises(ValueError, match="in_features 72"):
        cl.linear(torch.zeros(2, 71, dtype=dtype), packed)
    assert cl.pack(w.half()) is None  # no fp16 kernel: the caller keeps PyTorch


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_activations_against_16bit_panels_equal_the_fp32_product_of_rounded_weights(half):
    """The mixed product (fp32 x and output, 16-bit panels: the draft path of an fp32 model, a
    16-bit checkpoint served in fp32) is bitwise the fp32 product of the weight rounded to 16
    bits, for every row-count path, and a layer packed that way keeps fp32 in and out."""
    from dist_engine.kernels import linear as cl
    from dist_engine.layers.linear import ColumnParallelLinear, pack_weight, weight_bytes

    gen = torch.Generator().manual_seed(3)
    for out in (83, 200):
        w = torch.randn(out, 72, generator=gen) * 0.1
        w[0, :4] = torch.tensor([6e-6, -3e-7, 0.0, 60000.0])  # fp16 subnormals, zero, near its max
        b = torch.randn(out, generator=gen)
        mixed, rounded = cl.pack(w, half), cl.pack(w.to(half).float())
        assert mixed.panels.dtype == half
        for rows in (1, 2, 3, 4, 5, 9, 250):
            x = torch.randn(rows, 72, generator=gen)
            for bias in (None, b):
                y = cl.linear(x, mixed, bias)
                assert y.dtype == torch.float32 and torch.equal(y, cl.linear(x, rounded, bias))
    layer = ColumnParallelLinear(24, {None: (0, 40, 0)}, bias=True, dtype=torch.float32)
    layer.weight.data.normal_()
    dense, x = layer.weight.data.clone(), torch.randn(3, 24)
    pack_weight(layer, half)
    assert weight_bytes(layer) == (48 * 24) * 2 + 40 * 4
    torch.testing.assert_close(layer(x), x @ dense.to(half).float().T + layer.bias, atol=1e-5, rtol=1e-5)
    # no kernel reads bf16 activations against fp32 panels: a bf16 layer asked for fp32 panels
    # keeps its own dtype
    assert cl.pack(dense.bfloat16(), torch.float32) is None
    layer16 = ColumnParallelLinear(24, {None: (0, 40, 0)}, bias=False, dtype=torch.bfloat16)
    layer16.weight.data.copy_(dense)
    pack_weight(layer16, torch.float32)
    assert layer16.weight_packed.panels.dtype == torch.bfloat16
    assert layer16(x.bfloat16()).dtype == torch.bfloat16


def test_packed_projection_through_a_layer_is_the_dense_one():
    from dist_engine.layers.linear import ColumnParallelLinear, pack_weight, weight_bytes

    layer = ColumnParallelLinear(24, {None: (0, 40, 0)}, bias=True, dtype=torch.float32)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    dense, x = layer.weight.data.clone(), torch.randn(3, 24)
    pack_weight(layer)
    assert layer.weight.numel() == 0  # held once, as panels (3 of 16 rows) plus the bias
    assert weight_bytes(layer) == (48 * 24 + 40) * 4
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_layer_steps_match_the_pytorch_operators(dtype):
    """Rotary + K/V store and the residual add are bitwise PyTorch's; SiLU x up and the norm
    after the add within a last-bit rounding."""
    from dist_engine.kernels import fused
    from dist_engine.layers.norm import RMSNorm
    from dist_engine.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(3)
    T, Hq, Hk, D = 5, 6, 2, 16
    rot = RotaryEmbedding(D, 64, 10000.0, None, dtype)
    qkv = torch.randn(T, (Hq + 2 * Hk) * D + 8, generator=gen).to(dtype)[:, :-8]  # rows strided
    positions = torch.tensor([0, 7, 8, 63, 30])
    slots = torch.tensor([11, 3, 40, 0, 25])
    k_cache, v_cache = torch.zeros(48, Hk, D, dtype=dtype), torch.zeros(48, Hk, D, dtype=dtype)
    q = fused.rope_store(qkv, Hq, Hk, D, positions, rot.cos, rot.sin, slots, k_cache, v_cache)
    assert q is not None, "the C kernel did not build (see the log for the compiler error)"
    qk = rot.rotate(positions, qkv[:, :(Hq + Hk) * D].reshape(T, Hq + Hk, D))
    assert torch.equal(q, qk[:, :Hq])
    assert torch.equal(k_cache[slots], qk[:, Hq:])
    assert torch.equal(v_cache[slots], qkv[:, (Hq + Hk) * D:].reshape(T, Hk, D))
    untouched = torch.ones(48, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()

    gate_up = torch.randn(T, 2 * 40, generator=gen).to(dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=8e-3)
    torch.testing.assert_close(fused.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, **tol)

    norm = RMSNorm(40, 1e-5, dtype)
    norm.weight.data = (torch.randn(40, generator=gen) + 1).to(dtype)
    x, delta = (torch.randn(T, 40, generator=gen).to(dtype) for _ in range(2))
    total, normed = norm.add_forward(x, delta)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, norm(x + delta), **tol)
    norm.use_kernel = False  # the PyTorch path gives the same pair
    total2, normed2 = norm.add_forward(x, delta)
    assert torch.equal(total2, total)
    torch.testing.assert_close(normed2, normed, **tol)
