"""DeepSeek-V4 against transformers on a tiny random checkpoint with every layer type (sliding,
compressed sparse at ratio 4 with a top-3 indexer, heavily compressed at 16), hash-routed layers
and a 16-token window: logits and greedy tokens at TP=1, TP=2 + DCP=2 and CP=2; batched and
prefix-cached runs equal plain ones; the native MTP layer (released naming) against a reference
written here and lossless speculation with drafts across compression windows; FP8 weights with
UE8M0 scales and MXFP4 experts; DeepSeek's released checkpoint naming; the cache kinds' bookkeeping."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from v4_checkpoints import dequantized_copy, random_mtp, random_v4, save_v4

from dist_engine import LLM, SamplingParams
from dist_engine.config import EngineConfig, ModelConfig

r = random.Random(4)
PROMPT = [1] + [r.randrange(3, 320) for _ in range(70)]  # 71 tokens: 17 rows of 4, 4 of 16
ARGS = dict(skip_tokenizer_init=True, max_model_len=256, max_num_batched_tokens=40, num_kv_blocks=48)
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=4)


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """(transformers model, its checkpoint with an MTP layer, the MTP layer's parts)."""
    model = random_v4(0)
    one, mtp = random_mtp(5)
    path = save_v4(model, str(tmp_path_factory.mktemp("v4") / "tiny"), extra=mtp)
    return model, path, (one, mtp)


@pytest.fixture(scope="module")
def reference(v4):
    """transformers' logits at the prompt's last position and its 32 greedy tokens, each
    recomputed from the whole sequence (no cache)."""
    model = v4[0]
    seq = list(PROMPT)
    with torch.inference_mode():
        logits = torch.log_softmax(model(torch.tensor([seq]), use_cache=False).logits[0, -1], -1)
        for _ in range(32):
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return logits, seq[len(PROMPT):]


def _check(out, reference, tol=1e-4):
    logits, tokens = reference
    assert out.token_ids == tokens
    for tok, lp in out.logprobs[0].items():
        assert abs(lp - logits[tok].item()) < tol


def test_matches_transformers(v4, reference, caplog):
    """Chunked prefill (40 tokens a step) over 71 tokens and 32 decode steps, crossing many
    compression windows: transformers' logits and greedy tokens. The start-up log's bytes per
    kind are what was allocated, and it states the longest context the blocks hold."""
    from dist_engine.layers.kv_cache import LayerKV
    from dist_engine.worker.caches import flat_caches

    with caplog.at_level(logging.INFO, logger="dist_engine"):
        with LLM(v4[1], speculative="none", **ARGS) as llm:
            out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY)[0].outputs[0]
            runner, info = llm.engine.executor.worker.runner, llm.engine.cache_info
            assert runner.ratios == (4, 16) and runner.groups == ("full", "window16")
            assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
            real = {"full": 0, "window16": 0, "state": 0}
            for c, kind in zip(flat_caches(runner.kv_caches), runner.kinds, strict=True):
                real[kind.group] += (c.k.nbytes + (0 if c.shared else c.v.nbytes) if isinstance(c, LayerKV)
                                     else sum(t.nbytes for t in c.tensors.values()))
    _check(out, reference)
    assert info["allocated_bytes"] == real
    bs = info["block_size"]
    for group in ("full", "window16"):
        line = next(ln for ln in caplog.text.splitlines() if f"KV cache per rank, {group} attention" in ln)
        assert f"{real[group] / 2**20:.1f} MiB" in line
        assert f"{info['bytes_per_block_by_group'][group] / bs:g} bytes/token" in line
    assert "compressed K/V 1/4" in caplog.text and "compressed K/V 1/16" in caplog.text
    assert "indexer keys 1/4" in caplog.text and "compressor windows" in caplog.text
    assert f"longest context the cache can hold: {ARGS['num_kv_blocks'] * bs} tokens" in caplog.text


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2, decode_context_parallel_size=2),
                                    dict(context_parallel_size=2)], ids=["tp2dcp2", "cp2"])
def test_sequence_shards_match_transformers(v4, reference, ray_session, layout):
    """Window K/V, compressed rows and indexer keys striped over two shards (the indexer's
    top-k merged over them), attention merged in shard order: transformers' output. At TP=2
    the heads and their output groups split, the one KV head is not stored twice."""
    with LLM(v4[1], speculative="none", **layout, **ARGS) as llm:
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY)[0].outputs[0]
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    _check(out, reference)


def test_batched_and_prefix_cached_equal_plain(v4):
    """Four prompts (three sharing 64+ tokens) batched equal each alone; with prefix caching
    the later ones resume from cached compressed rows, window blocks and a compressor state
    checkpoint and still give the same tokens."""
    g = random.Random(1)
    base = [1] + [g.randrange(3, 320) for _ in range(100)]
    prompts = [base[:90], base[:70] + [5, 6, 7], [1] + [g.randrange(3, 320) for _ in range(33)], base[:100]]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(ARGS, max_num_batched_tokens=64, num_kv_blocks=80, state_checkpoint_interval=64)
    with LLM(v4[1], speculative="none", enable_prefix_caching=False, **kw) as llm:
        solo = [llm.generate(prompt_token_ids=[p], sampling_params=sp)[0].outputs[0].token_ids for p in prompts]
        batched = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    assert batched == solo
    with LLM(v4[1], speculative="none", enable_prefix_caching=True, **kw) as llm:
        cached = [llm.generate(prompt_token_ids=[p], sampling_params=sp)[0].outputs[0].token_ids for p in prompts]
        assert llm.engine.state.checkpoints.hits >= 2 and llm.engine.stats()["prefix_cache_hit_tokens"] >= 128
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    assert cached == solo


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps))


def test_mtp_layer_matches_a_reference(v4):
    """The MTP layer's logits at every position of a prefill, against transformers' V4 block
    driven by hand: h_proj(hnorm(main streams before hc_head)) + e_proj(enorm(embedding of the
    next token)), the block, its own hc_head and norm, the shared head."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    from dist_engine.worker.spec_decode import MTPDecoder

    model, path, (one, mtp) = v4
    captured = []
    original = MTPDecoder.forward_layer

    def spy(self, positions, ids, hidden, meta):
        g = original(self, positions, ids, hidden, meta)
        captured.append((ids.clone(), self.runner.model.compute_logits(self.mtp.layer.shared_head.norm(g))))
        return g

    MTPDecoder.forward_layer = spy
    try:
        with LLM(path, speculative="mtp", num_speculative_tokens=1, speculative_config={"draft_dtype": "float32"},
                 **dict(ARGS, max_num_batched_tokens=128)) as llm:
            llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(temperature=0, max_tokens=2))
    finally:
        MTPDecoder.forward_layer = original
    ids, ours = captured[0]  # the catch-up over the prompt: token p + 1 at position p
    seq = PROMPT + [int(ids[-1])]
    streams = {}
    hook = model.model.hc_head.register_forward_pre_hook(lambda m, a: streams.setdefault("s", a[0]))
    with torch.inference_mode():
        model(torch.tensor([seq[:-1]]), use_cache=False)
        hook.remove()
        emb = model.model.embed_tokens(torch.tensor([seq[1:]]))  # [1, L, H]
        x = (_rms(streams["s"], mtp["mtp.0.hnorm.weight"]) @ mtp["mtp.0.h_proj.weight"].T
             + (_rms(emb, mtp["mtp.0.enorm.weight"]) @ mtp["mtp.0.e_proj.weight"].T).unsqueeze(2))
        pos = torch.arange(len(PROMPT))[None]
        pe = {t: one.model.rotary_emb(emb, position_ids=pos, layer_type=t) for t in ("main", "compress")}
        mask = create_sliding_window_causal_mask(config=one.config, inputs_embeds=emb, attention_mask=None,
                                                 cache=None, position_ids=pos)
        y = one.model.layers[0](x, position_embeddings=pe, position_ids=pos, attention_mask=mask, input_ids=None)
        ref = model.lm_head(one.model.norm(one.model.hc_head(y)))[0]
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_speculation_is_lossless(v4, k):
    """K drafts per step, greedy and seeded: plain decoding's tokens. Drafts that cross a
    compression window and are rejected happen (they complete rows, feed the compressors and
    indexer, then are thrown away) and leave nothing behind."""
    from dist_engine.worker.spec_decode import MTPDecoder

    g = random.Random(2)
    prompts = [[1] + [g.randrange(3, 320) for _ in range(n)] for n in (30, 45, 7)]
    sps = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
           SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True)]
    kw = dict(ARGS, max_num_batched_tokens=64, num_kv_blocks=80)
    with LLM(v4[1], speculative="none", **kw) as llm:
        plain = [[o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
                 for sp in sps]
    crossed = []
    original = MTPDecoder.verify

    def spy(self, batch, hidden):
        out = original(self, batch, hidden)
        for s in batch.sample_seqs:  # a rejected draft whose position completes a row of 4
            first = s.context_len - s.num_drafts
            kept = out[s.seq_id].num_accepted
            crossed.extend(p for p in range(first + kept, s.context_len) if (p + 1) % 4 == 0)
        return out

    MTPDecoder.verify = spy
    try:
        with LLM(v4[1], speculative="mtp", num_speculative_tokens=k, min_draft_acceptance=0.0, **kw) as llm:
            spec = [[o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
                    for sp in sps]
            stats = llm.engine.stats()["spec_decode"]
    finally:
        MTPDecoder.verify = original
    assert spec == plain
    assert crossed and stats["num_accepted_tokens"] > 0 and len(stats["drafted_at"]) == k


def test_fp8_and_fp4_weights_equal_their_fp32_values(v4, tmp_path):
    """The released checkpoints' formats: FP8 weights in 16 x 16 blocks with power-of-two
    scales stored as float8_e8m0fnu (``*.scale``), kept FP8 in memory, and MXFP4 routed
    experts (``expert_dtype: "fp4"``: E2M1 codes two per byte, a UE8M0 scale per 32), kept
    packed: the same output as the same weights given in fp32."""
    from dist_engine.kernels.qlinear import QWeight

    quant = save_v4(v4[0], str(tmp_path / "fp8"), naming="released", fp8_block=16, fp4_experts=True)
    plain = dequantized_copy(quant, str(tmp_path / "fp32"), 16)
    outs = []
    for path in (quant, plain):
        with LLM(path, speculative="none", **ARGS) as llm:
            outs.append(llm.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY)[0].outputs[0])
            layer = llm.engine.executor.worker.runner.model.model.layers[1]
            assert (layer.self_attn.q_b_proj.weight.dtype == torch.float8_e4m3fn) == (path == quant)
            assert layer.self_attn.compressor.kv_proj.weight.dtype != torch.float8_e4m3fn  # bf16 as shipped
            expert = next(iter(layer.mlp.experts.values()))
            assert isinstance(expert.down_proj.weight_packed, QWeight) == (path == quant)
            formats = llm.engine.cache_info
            assert ("weight_bytes[mxfp4]" in formats) == (path == quant)
    assert outs[0].token_ids == outs[1].token_ids
    for tok, lp in outs[1].logprobs[0].items():
        assert abs(outs[0].logprobs[0][tok] - lp) < 1e-4


def test_released_naming_loads(v4, reference, tmp_path):
    """DeepSeek's names (``embed.weight``, ``layers.N.attn.wq_a``, ``attn_sink``,
    ``ffn.experts.E.w1``, ``hc_attn_fn``, ``hc_head_fn``, ``head.weight``, ``mtp.0.*``) and
    the legacy config spelling (``compress_ratios`` with the MTP layer's entry,
    ``num_hash_layers``, ``qk_rope_head_dim``)."""
    import json

    path = save_v4(v4[0], str(tmp_path / "released"), naming="released", extra=v4[2][1])
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters"):
        cfg.pop(key)
    cfg.update(compress_ratios=[0, 4, 16, 4, 0], num_hash_layers=2, qk_rope_head_dim=16,
               compress_rate_hca=16, rope_theta=10000.0, compress_rope_theta=160000.0)
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f)
    assert ModelConfig.from_pretrained(path).v4 == ModelConfig.from_pretrained(v4[1]).v4
    with LLM(path, speculative="none", **ARGS) as llm:
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY)[0].outputs[0]
    _check(out, reference)


@pytest.mark.parametrize("change,match", [
    (dict(sliding_window=8), "sliding_window=8 is shorter"),
    (dict(compress_rates={"compressed_sparse_attention": 6, "heavily_compressed_attention": 16}),
     "compression ratio 6: it must be a power of two"),
    (dict(index_topk=0), "index_topk=0"),
    (dict(layer_types=["sliding_attention"] * 3 + ["dense"]), "layer_types entries must be one of"),
    (dict(quantization_config={"quant_method": "fp6"}), "quant_method 'fp6' is not supported"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "method 'gptq' is not supported for them"),
])
def test_inconsistent_configs_are_value_errors(v4, change, match):
    import json

    with open(f"{v4[1]}/config.json") as f:
        raw = {**json.load(f), **change}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(raw, "tiny")


def test_layout_errors_name_the_setting(v4):
    mcfg = ModelConfig.from_pretrained(v4[1])
    from dist_engine.config import CacheConfig, ParallelConfig

    with pytest.raises(ValueError, match="block_size=8 must be a multiple of every compression ratio"):
        EngineConfig(model=mcfg, cache=CacheConfig(block_size=8))
    with pytest.raises(ValueError, match="must divide o_groups=2"):
        EngineConfig(model=mcfg, parallel=ParallelConfig(tensor_parallel_size=4, executor="ray"))


def test_speculative_auto_turns_on_for_shipped_mtp(v4, tmp_path):
    """``--speculative auto``: on (reading the raw streams) where the checkpoint ships ``mtp.0.*``,
    off where the config announces an MTP layer but no weights came with it."""
    from dist_engine.config.args import EngineArgs

    spec = EngineArgs(model=v4[1], speculative="auto").speculative_for(v4[1], ModelConfig.from_pretrained(v4[1]))
    assert spec is not None and (spec.hidden_stage, spec.feedback) == ("raw", "raw")
    bare = save_v4(v4[0], str(tmp_path / "bare"))
    assert ModelConfig.from_pretrained(bare).num_mtp_layers == 1
    assert EngineArgs(model=bare, speculative="auto").speculative_for(bare, ModelConfig.from_pretrained(bare)) is None
