"""TurboQuant KV cache (``--kv-cache-dtype turboquant4 | turboquant3``).

The quantizer against the paper's bound on random unit vectors (and the C kernels against the
PyTorch maths); attention over a quantized cache, through the C decode kernel and the PyTorch
path, against attention over its dequantized rows in float64 and against the exact cache; the
engine: bytes per token, greedy output the same batched or alone, chunked, preempted, with and
without prefix caching and the C kernel; what TP, CP and DCP rely on, in one process.
Speculation, the static decode path, TP=2 + DCP=2 over Ray, the hybrid Qwen3.5 and quantized
weights are in ``test_turboquant_compose.py``; the default model's teacher-forced agreement is in
``test_turboquant_default_model.py``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from dist_engine import LLM, SamplingParams
from dist_engine.kernels import paged_attention as pk
from dist_engine.kernels import turboquant as tk
from dist_engine.layers import turboquant as tq
from dist_engine.layers.attention import AttentionMetadata, paged_attention
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.tq_cache import TurboQuantKV
from dist_engine.worker.messages import SeqWork

PRESETS = ("turboquant4", "turboquant3")


def paper_bound(bits: int) -> float:
    """Zandieh et al.: mean squared error of a unit vector at ``bits`` per coordinate."""
    return math.sqrt(3) * math.pi / 2 * 4.0 ** -bits


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dim", [64, 128, 576, 24])
def test_unit_vectors_within_the_paper_bound(bits, dim):
    """Random unit vectors (and one spiky vector, the worst case of a fixed Hadamard rotation)
    round-trip within (sqrt(3) pi / 2) 4^-b; Lloyd-Max is close to its own optimum."""
    gen = torch.Generator().manual_seed(bits * 1000 + dim)
    x = torch.randn(1500, 2, dim, generator=gen)
    x[0, 0] = 0.0
    x[0, 0, 3] = 1.0  # a basis vector
    x = x / x.norm(dim=-1, keepdim=True)
    spec = tq.TQSpec(bits, dim)
    rot = tq.rotations(dim, layer=5, heads=range(2))
    codes, scales = tq.encode(x, rot, spec)
    mse = ((tq.dequantize(codes, scales, rot, spec) - x) ** 2).sum(-1)  # [N, H]
    assert mse.mean() <= paper_bound(bits)
    assert mse.mean() >= paper_bound(bits) / 2  # not a degenerate (lossless) encoding
    assert codes.shape == (1500, 2, dim * bits // 8) and scales.dtype == torch.float16


def test_codebook_is_lloyd_max_and_rotations_are_orthogonal():
    c, b = tq.codebook(128, 3)
    torch.testing.assert_close(b, (c[1:] + c[:-1]) / 2)  # boundaries halfway between centroids
    torch.testing.assert_close(c, -c.flip(0))  # symmetric law, symmetric quantizer
    # near the Gaussian 3-bit Lloyd-Max levels (the sphere law has lighter tails at D = 128)
    torch.testing.assert_close(c[4:] * math.sqrt(128), torch.tensor([0.245, 0.756, 1.344, 2.152]),
                               atol=0.03, rtol=0)
    r = tq.rotation(576, layer=0, head=0)
    torch.testing.assert_close(r @ r.T, torch.eye(576), atol=1e-5, rtol=0)
    assert not torch.equal(r, tq.rotation(576, layer=0, head=1))
    assert torch.equal(tq.rotation(64, 3, 2), tq.rotation(64, 3, 2))  # fixed by (layer, head)


@pytest.mark.parametrize("bits", [3, 4])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (7, 3, 64))
    packed = tq.pack(codes, bits)
    assert packed.shape == (7, 3, 8 * bits) and packed.dtype == torch.uint8
    assert torch.equal(tq.unpack(packed, bits), codes)
    # group layout: code i of a group in bits b*i.. of its little-endian word
    one = torch.zeros(8, dtype=torch.long)
    one[1] = 1
    assert tq.pack(one, bits)[0].item() == 1 << bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", PRESETS)
def test_c_kernels_match_the_pytorch_maths(preset, dtype):
    """Codes equal except where a rotated coordinate sits on a decision boundary within rounding
    (then one level apart), scales equal; decoded rows and rotations equal within fp32 rounding."""
    assert tk.available(dtype), "the turboquant kernel did not build (see the log)"
    gen = torch.Generator().manual_seed(2)
    kv = TurboQuantKV.empty(preset, 300, 3, 64, torch.device("cpu"), zero_slots=16, layer=2,
                            head_start=1)
    x = (torch.randn(200, 3, 64, generator=gen) * 4).to(dtype)
    slots = torch.randperm(300, generator=gen)[:200]
    kv.write(slots, x, x)
    ref_codes, ref_scales = tq.encode(x, kv.rot, kv.k.spec)
    bits = kv.k.spec.bits
    got, ref = tq.unpack(kv.k.codes[slots], bits), tq.unpack(ref_codes, bits)
    assert (got != ref).float().mean() < 1e-3 and (got - ref).abs().max() <= 1
    same = (got == ref).all(-1)
    assert torch.equal(kv.k.scales[slots][same], ref_scales[same])
    decoded = kv.gather(slots.view(20, 10), torch.float32)[0]  # [20, 10, Hk, D]
    torch.testing.assert_close(decoded.view(200, 3, 64)[same],
                               tq.decode(ref_codes, ref_scales, kv.k.spec, torch.float32)[same])
    q = torch.randn(5, 9, 64, generator=gen).to(dtype)  # 3 query heads per KV head
    rotated = kv.to_cache_basis(q)
    expect = torch.einsum("hed,thgd->thge", kv.rot, q.float().view(5, 3, 3, 64)).reshape(5, 9, 64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(rotated.float(), expect, atol=tol, rtol=tol)
    torch.testing.assert_close(kv.from_cache_basis(rotated).float(), q.float(), atol=tol, rtol=tol)


def _sequences(block_size: int, free: list[int]) -> tuple[list[SeqWork], list[int], int]:
    """Decode, verification and a context over several key chunks, on scattered blocks."""
    seqs, starts, T = [], [], 0
    for ctx, Q in [(150, 1), (17, 1), (64, 4), (700, 3), (1, 1)]:
        n = (ctx + block_size - 1) // block_size
        seqs.append(SeqWork(0, (0,) * Q, ctx - Q, tuple(free[:n]), True))
        free = free[n:]
        starts.append(T)
        T += Q
    return seqs, starts, T


def _padded_groups(seqs, starts, block_size) -> AttentionMetadata:
    """The PyTorch path's metadata for the same sequences (one padded group each)."""
    from dist_engine.worker.batch import _group

    groups = [_group([s], [st], block_size, None, 3, torch.float32, torch.device("cpu"), False)
              for s, st in zip(seqs, starts)]
    return AttentionMetadata(num_tokens=sum(len(s.token_ids) for s in seqs),
                             slot_mapping=torch.zeros(0, dtype=torch.long), groups=groups)


@pytest.mark.parametrize("preset,rel_bound", [("turboquant4", 0.18), ("turboquant3", 0.33)])
def test_attention_over_the_quantized_cache(preset, rel_bound):
    """The C kernel and the PyTorch path both equal attention over the dequantized rows
    (float64) within 2e-6; against the exact cache the output's relative error stays under
    ``rel_bound`` (measured 0.134 / 0.245 on these Gaussian K/V with queries scaled so that
    attention is far from uniform)."""
    assert pk.available(torch.float32)
    gen = torch.Generator().manual_seed(0)
    block_size, num_slots, Hq, Hk, D = 16, 4096, 9, 3, 64
    k = torch.randn(num_slots, Hk, D, generator=gen) + 0.5  # a common component, as real keys
    v = torch.randn(num_slots, Hk, D, generator=gen)
    exact = LayerKV(k, v)
    kv = TurboQuantKV.empty(preset, num_slots, Hk, D, torch.device("cpu"), zero_slots=16, layer=0,
                            head_start=0, k_mean=k.mean(0))
    kv.write(torch.arange(num_slots), k, v)
    free = torch.randperm(num_slots // block_size, generator=gen).tolist()
    seqs, starts, T = _sequences(block_size, free)
    q = torch.randn(T, Hq, D, generator=gen) * 2
    group = pk.make_group(seqs, starts, block_size, None, T)
    meta = AttentionMetadata(num_tokens=T, slot_mapping=torch.zeros(0, dtype=torch.long), groups=[group])
    scale = D ** -0.5
    through_kernel = paged_attention(q, kv, meta, scale)
    through_torch = paged_attention(q, kv, _padded_groups(seqs, starts, block_size), scale)
    exact_out = paged_attention(q, exact, meta, scale)
    # float64 attention over the dequantized rows (the keys' calibrated mean added back; a few
    # keys, shorter than their centred form, are stored uncentred and decode less the mean)
    slots = torch.arange(num_slots)
    uncentred = torch.signbit(kv.k.scales.float())  # [num_slots, Hk]
    assert 0.005 < uncentred.float().mean() < 0.1 and not torch.signbit(kv.v.scales.float()).any()
    deq_k = tq.dequantize(kv.k.codes[slots], kv.k.scales[slots], kv.rot, kv.k.spec, kv.k.shift) + k.mean(0)
    deq_v = tq.dequantize(kv.v.codes[slots], kv.v.scales[slots], kv.rot, kv.v.spec)
    from test_cpu_kernels import reference

    want = reference(q.double(), deq_k.double(), deq_v.double(), seqs, starts, block_size, None, scale)
    torch.testing.assert_close(through_kernel, want, atol=2e-6, rtol=0)
    torch.testing.assert_close(through_torch, want, atol=2e-6, rtol=0)
    rel = (through_kernel - exact_out).norm() / exact_out.norm()
    assert rel < rel_bound


def test_c_kernel_result_does_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(4)
    kv = TurboQuantKV.empty("turboquant3", 2048, 2, 32, torch.device("cpu"), 16, layer=1, head_start=0)
    kv.write(torch.arange(2048), torch.randn(2048, 2, 32, generator=gen),
             torch.randn(2048, 2, 32, generator=gen))
    seqs = [SeqWork(0, (0,), 299, tuple(range(i * 20, i * 20 + 19)), True) for i in range(4)]
    q = kv.to_cache_basis(torch.randn(4, 6, 32, generator=gen))
    together = torch.empty(4, 6, 32)
    kv.attend_paged(q, pk.make_group(seqs, [0, 1, 2, 3], 16, None, 4), 0.2, together)
    for i, s in enumerate(seqs):
        alone = torch.empty(1, 6, 32)
        kv.attend_paged(q[i:i + 1], pk.make_group([s], [0], 16, None, 1), 0.2, alone)
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_shorter_than_their_centred_form_are_stored_uncentred(dtype):
    """A key is stored centred unless it is shorter as it is (an attention sink's key, near 0
    here): then its scale's sign bit is set, and every key decodes, C kernel and PyTorch alike,
    to R (k^ - mean), within the codec's error of the shorter form; values never shift."""
    gen = torch.Generator().manual_seed(8)
    N, Hk, D = 64, 2, 64
    mean = torch.randn(Hk, D, generator=gen)
    k = mean + 0.3 * torch.randn(N, Hk, D, generator=gen)
    k[0] = 0.05 * torch.randn(Hk, D, generator=gen)  # a sink: far from the mean, short itself
    k = k.to(dtype)
    kv = TurboQuantKV.empty("turboquant4", N, Hk, D, torch.device("cpu"), 0, layer=1, head_start=0,
                            k_mean=mean)
    kv.write(torch.arange(N), k, k)
    kf = k.float()
    raw = kf.norm(dim=-1) < (kf - mean).norm(dim=-1)  # [N, Hk]
    assert raw[0].all() and raw.sum() == Hk
    assert torch.equal(torch.signbit(kv.k.scales.float()), raw)
    assert not torch.signbit(kv.v.scales.float()).any()
    codes, scales = tq.encode(k, kv.rot, kv.k.spec, kv.k.shift)  # the PyTorch path decides alike
    assert torch.equal(torch.signbit(scales.float()), raw)
    assert (tq.unpack(codes, 4) != tq.unpack(kv.k.codes, 4)).float().mean() < 1e-2
    slots = torch.arange(N)
    got = kv.gather(slots, torch.float32)[0]  # [N, Hk, D], the C kernel's rotated rows
    ref = tq.decode(kv.k.codes, kv.k.scales, kv.k.spec, torch.float32, kv.k.shift)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    back = torch.einsum("hed,nhe->nhd", kv.rot, got) + mean  # k^
    stored = torch.where(raw.unsqueeze(-1), kf, kf - mean)
    err = ((back - kf) ** 2).sum(-1) / (stored ** 2).sum(-1)
    assert err.mean() < paper_bound(4) and err[0].max() < 3 * paper_bound(4)


@pytest.mark.parametrize("preset", PRESETS)
def test_shards_store_like_one_rank_and_merge_in_the_rotated_basis(preset):
    """What TP, CP and DCP rely on, in one process (the engine with TP=2 + DCP=2 over Ray is in
    test_turboquant_compose.py): a rank holding KV heads 1..2 of 3 (TP) stores their rows bit
    for bit as the one-rank cache does, and rotates queries alike; caches holding alternate
    blocks of the tokens (CP / DCP shards, same calibrated mean) store them alike too, and
    their partial attentions in the rotated basis, merged by log-sum-exp, rotated back once,
    equal one cache's attention over all the tokens."""
    from dist_engine.layers.attention import _attend, merge_partials

    gen = torch.Generator().manual_seed(6)
    N, Hk, D, cpu = 96, 3, 64, torch.device("cpu")
    k, v = torch.randn(N, Hk, D, generator=gen) + 0.5, torch.randn(N, Hk, D, generator=gen)
    mean = k.mean(0)
    one = TurboQuantKV.empty(preset, N, Hk, D, cpu, 0, layer=4, head_start=0, k_mean=mean)
    one.write(torch.arange(N), k, v)
    tp = TurboQuantKV.empty(preset, N, 2, D, cpu, 0, layer=4, head_start=1, k_mean=mean[1:])
    tp.write(torch.arange(N), k[:, 1:], v[:, 1:])
    for a, b in ((one.k, tp.k), (one.v, tp.v)):
        assert torch.equal(a.codes[:, 1:], b.codes) and torch.equal(a.scales[:, 1:], b.scales)
    q = torch.randn(5, 9, D, generator=gen) * 2  # 3 query heads per KV head
    assert torch.equal(one.to_cache_basis(q)[:, 3:], tp.to_cache_basis(q[:, 3:].contiguous()))

    blocks = torch.arange(N).view(-1, 16)  # 6 blocks of 16 tokens: shard r holds blocks r, r + 2, ...
    shards = []
    for r in range(2):
        mine = blocks[r::2].reshape(-1)
        kv = TurboQuantKV.empty(preset, N, Hk, D, cpu, 0, layer=4, head_start=0, k_mean=mean)
        kv.write(torch.arange(len(mine)), k[mine], v[mine])  # its own slots, packed from 0
        assert torch.equal(kv.k.codes[:len(mine)], one.k.codes[mine])
        assert torch.equal(kv.v.scales[:len(mine)], one.v.scales[mine])
        shards.append((kv, len(mine)))

    def partial(kv: TurboQuantKV, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        kr, vr = kv.window(0, n, torch.float32)  # [n, Hk, D], rotated
        qr = kv.to_cache_basis(q).view(5, Hk, 3, D).permute(1, 2, 0, 3).reshape(1, Hk, 15, D)
        out, lse = _attend(qr, kr.permute(1, 0, 2).unsqueeze(0), vr.permute(1, 0, 2).unsqueeze(0),
                           None, D ** -0.5)
        return out, lse  # [1, Hk, 15, D], [1, Hk, 15]

    def back(kv: TurboQuantKV, out: torch.Tensor) -> torch.Tensor:  # -> [5, 9, D] model basis
        return kv.from_cache_basis(out.view(Hk, 3, 5, D).permute(2, 0, 1, 3).reshape(5, 9, D))

    parts = [partial(kv, n) for kv, n in shards]
    merged = merge_partials([o for o, _ in parts], [lse for _, lse in parts])[0]
    whole = back(one, partial(one, N)[0])
    torch.testing.assert_close(back(shards[0][0], merged), whole, atol=1e-5, rtol=0)


# ---- the engine ------------------------------------------------------------------------------
rng = random.Random(5)
LONG = [1] + [rng.randrange(3, 320) for _ in range(180)]
PROMPTS = [LONG, LONG[:90] + [7, 8, 9], [1] + [rng.randrange(3, 320) for _ in range(30)], [1, 9]]
ARGS = dict(skip_tokenizer_init=True, max_model_len=320, block_size=4)


def _greedy(llm: LLM, prompts=PROMPTS, n: int = 16) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]


@pytest.fixture(scope="module", params=PRESETS)
def tq_reference(request, tiny_models):
    """Each prompt alone on a roomy cache, no prefix caching."""
    path = tiny_models("llama")
    with LLM(path, kv_cache_dtype=request.param, num_kv_blocks=300, enable_prefix_caching=False,
             **ARGS) as llm:
        assert isinstance(llm.engine.executor.worker.runner.kv_caches[0], TurboQuantKV)
        alone = [_greedy(llm, [p])[0] for p in PROMPTS]
    return request.param, path, alone


def test_engine_bytes_per_token_and_start_up(tiny_models):
    """Tiny llama: 3 KV heads of 8 values, 2 layers. 4 bits: (4 + 2) bytes a row; 3 bits:
    (3 + 2); the start-up log's figure is the one allocated."""
    path = tiny_models("llama")
    for preset, row in (("turboquant4", 6), ("turboquant3", 5)):
        with LLM(path, kv_cache_dtype=preset, num_kv_blocks=40, **ARGS) as llm:
            assert llm.engine.cache_info["bytes_per_block"] == 2 * 2 * 3 * row * 4
            caches = llm.engine.executor.worker.runner.kv_caches
            allocated = sum(c.k.codes.nbytes + c.k.scales.nbytes + c.v.codes.nbytes + c.v.scales.nbytes
                            for c in caches)
            assert allocated == 40 * llm.engine.cache_info["bytes_per_block"]
            assert all(c.k_mean is not None and c.k_mean.abs().sum() > 0 for c in caches)


def test_engine_batched_chunked_preempted_and_prefix_cached(tq_reference):
    """Greedy tokens equal each prompt run alone: batched, in 32-token prefill chunks, with the
    cache too small for all four (preemption), with prefix caching (a hit on LONG's blocks),
    and with the C decode kernel switched off (PyTorch path); every block back at the end."""
    preset, path, alone = tq_reference
    with LLM(path, kv_cache_dtype=preset, num_kv_blocks=300, max_num_batched_tokens=32, **ARGS) as llm:
        runner = llm.engine.executor.worker.runner
        assert runner.use_paged_kernel
        assert _greedy(llm) == alone
        again = llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True))[0]
        assert again.metrics.prefix_hit_tokens >= 80 and again.outputs[0].token_ids == alone[1]
        runner.use_paged_kernel = False
        assert _greedy(llm) == alone
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    with LLM(path, kv_cache_dtype=preset, num_kv_blocks=70, **ARGS) as llm:
        assert _greedy(llm) == alone
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.blocks.num_free == 70


def test_quantized_output_stays_close_to_exact(tiny_models):
    """The first token's top-5 logprobs after a 181-token prompt read back from the codes."""
    path = tiny_models("llama")
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    got = {}
    for dtype in ("auto", *PRESETS):
        with LLM(path, kv_cache_dtype=dtype, num_kv_blocks=80, **ARGS) as llm:
            got[dtype] = llm.generate(prompt_token_ids=[LONG], sampling_params=params)[0].outputs[0]
    exact = got["auto"].logprobs[0]
    for preset, bound in (("turboquant4", 0.1), ("turboquant3", 0.3)):
        lp = got[preset].logprobs[0]
        assert got[preset].token_ids == got["auto"].token_ids
        assert max(abs(lp[t] - exact[t]) for t in set(lp) & set(exact)) < bound


def test_rows_that_are_not_a_multiple_of_8_are_refused(tiny_models):
    import dataclasses

    from dist_engine.config import ModelConfig
    from dist_engine.config.args import EngineArgs

    path = tiny_models("llama")
    odd = dataclasses.replace(ModelConfig.from_pretrained(path), head_dim=12)
    with pytest.raises(ValueError, match="groups of 8"):
        EngineArgs(path, kv_cache_dtype="turboquant4", **ARGS).engine_config(path, odd)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(path, kv_cache_dtype="turboquant2", **ARGS)

