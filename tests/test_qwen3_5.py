"""Qwen3.5 (hybrid Gated DeltaNet + gated attention) against transformers on tiny random
checkpoints (conftest ``make_qwen3_5``: every parameter random, constants included), driven by
``qwen3_5_harness``. Prompts are several delta-rule chunks (64 tokens) long."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import hf_model
from dist_engine.config import EngineConfig, ModelConfig, ParallelConfig
from dist_engine.distributed.comm import Communicator
from dist_engine.kv_cache.kinds import PagedKV, RecurrentState, bytes_per_block, state_bytes_per_seq
from dist_engine.layers.state_cache import LayerState
from dist_engine.models.qwen3_5 import Qwen3_5GatedDeltaNet
from dist_engine.worker.batch import build_batch
from dist_engine.worker.messages import SeqWork
from qwen3_5_harness import (  # noqa: F401  (one_thread: an autouse fixture)
    ATOL,
    BLOCK,
    CPU,
    PROMPT,
    Harness,
    load_ours,
    one_thread,
    table,
)


@pytest.fixture(scope="module")
def hf_logits(qwen3_5_models):
    cache = {}

    def get(name: str) -> torch.Tensor:
        if name not in cache:
            with torch.inference_mode():
                cache[name] = hf_model(qwen3_5_models(name))(torch.tensor([PROMPT])).logits[0].float()
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
def test_logits_match_transformers_one_shot_and_chunked(qwen3_5_models, hf_logits, name):
    """300 tokens (4.7 chunks of the delta rule) in one pass, and in prefill chunks that start
    and end mid-grid with single-token (recurrent) steps among them."""
    model = load_ours(qwen3_5_models(name))
    ref = hf_logits(name)
    torch.testing.assert_close(Harness(model).feed(PROMPT, [300]), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(Harness(model).feed(PROMPT, [37, 100, 1, 1, 161]), ref, atol=ATOL, rtol=0)


def test_resumed_prefill_is_bitwise(qwen3_5_models):
    """A prefill resumed from a state saved on the chunk grid (copied into another slot, as a
    prefix-cache hit restores it) computes bitwise what the uninterrupted one does. Split into
    grid-aligned chunks, the Gated DeltaNet states stay bitwise too (the attention layer's rows
    of a chunk that ends earlier may differ in the last bit: the CPU attention kernel blocks
    keys by their count)."""
    model = load_ours(qwen3_5_models("qwen3_5"))
    whole = Harness(model)
    ref = whole.feed(PROMPT, [300])
    h = Harness(model)
    first = h.feed(PROMPT, [128])
    for c in h.caches:
        if isinstance(c, LayerState):  # the checkpoint after 128 tokens into slot 2
            c.copy_slots(torch.tensor([2]), torch.tensor([0]))
    rest = h.feed(PROMPT, [172], start=128, slot=2)  # the same blocks, the restored state
    assert torch.equal(torch.cat([first, rest]), ref)
    for ours, want in zip(h.states(2), whole.states(0)):
        assert all(torch.equal(ours[k], want[k]) for k in want)
    split = Harness(model)
    torch.testing.assert_close(split.feed(PROMPT, [64, 64, 64, 108]), ref, atol=1e-5, rtol=0)
    for ours, want in zip(split.states(0), whole.states(0)):  # layers 0-2, before any attention
        assert all(torch.equal(ours[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
def test_greedy_decode_matches_transformers_generation(qwen3_5_models, qwen3_5_generated, name):
    """32 recurrent single-token steps after a 150-token prefill = transformers' cached
    generation."""
    h = Harness(load_ours(qwen3_5_models(name)))
    tokens = PROMPT[:150]
    logits = h.feed(tokens, [150])
    for _ in range(32):
        tokens.append(int(logits[-1].argmax()))
        logits = h.feed(tokens, [1], start=len(tokens) - 1)
    assert tokens[150:] == qwen3_5_generated(name)


def test_batched_step_and_verification_states(qwen3_5_models):
    """One step mixing a verification (1 token + 3 drafts), a prefill chunk and a decode gives
    each sequence what it gets alone, and keeps the state after every verified token: the
    state a rollback to j accepted tokens restores is exactly the state after feeding them."""
    model = load_ours(qwen3_5_models("qwen3_5"))
    solo, batch = Harness(model), Harness(model)
    for seq, n in ((0, 90), (2, 70)):  # earlier context of the verifying and decoding sequences
        solo.feed(PROMPT, [n], seq=seq)
        batch.feed(PROMPT, [n], seq=seq)
    verify = PROMPT[90:94]
    alone, kept_solo = [], []  # plain decode of the four tokens, and the state after each
    for j in range(4):
        alone.append(solo.feed(PROMPT, [1], seq=0, start=90 + j))
        kept_solo.append(solo.states(0))
    prefill = solo.feed(PROMPT, [65], seq=1)
    decode = solo.feed(PROMPT, [1], seq=2, start=70)
    logits, b = batch.step([batch.work(0, verify, 90, drafts=3), batch.work(1, PROMPT[:65], 0),
                            batch.work(2, PROMPT[70:71], 70)])
    assert torch.equal(logits[:4], torch.cat(alone))
    assert torch.equal(logits[4:69], prefill)
    assert torch.equal(logits[69:], decode)
    assert b.meta.state.keep_per_token
    linear = [i for i, layer in enumerate(model.model.layers) if layer.layer_type == "linear_attention"]
    assert sorted(b.meta.state.kept) == linear
    for n, layer in enumerate(linear):
        kept = b.meta.state.kept[layer]
        for j in range(4):
            for name, want in kept_solo[j][n].items():
                assert torch.equal(kept[name][0, j], want), (layer, name, j)
        assert torch.equal(kept["ssm"][2, 0], batch.states(2)[n]["ssm"])  # the decode's one token
    # the slot holds the state after all four fed tokens (the runner restores the accepted one)
    assert all(torch.equal(batch.states(0)[n]["ssm"], kept_solo[3][n]["ssm"]) for n in range(len(linear)))


def test_fused_expert_tensors_load(qwen3_5_models, tmp_path):
    """Experts stored as fused 3-D tensors (``experts.gate_up_proj`` [E, 2I, H],
    ``experts.down_proj`` [E, H, I]) load into the same weights as per-expert tensors."""
    from safetensors.torch import load_file, save_file

    src = qwen3_5_models("qwen3_5_moe")
    dst = tmp_path / "fused"
    shutil.copytree(src, dst)
    weights = load_file(os.path.join(src, "model.safetensors"))
    fused = {k: v for k, v in weights.items() if ".mlp.experts." not in k}
    for i in range(4):
        pre = f"model.layers.{i}.mlp.experts."
        fused[pre + "gate_up_proj"] = torch.stack([torch.cat([weights[f"{pre}{e}.gate_proj.weight"],
                                                              weights[f"{pre}{e}.up_proj.weight"]]) for e in range(8)])
        fused[pre + "down_proj"] = torch.stack([weights[f"{pre}{e}.down_proj.weight"] for e in range(8)])
    save_file(fused, str(dst / "model.safetensors"))
    ours = Harness(load_ours(str(dst))).feed(PROMPT[:80], [80])
    assert torch.equal(ours, Harness(load_ours(src)).feed(PROMPT[:80], [80]))
    del fused["model.layers.2.mlp.experts.down_proj"]
    save_file(fused, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.experts\.0\.down_proj"):
        load_ours(str(dst))


class _Partial(Communicator):
    """Rank ``rank`` of ``world_size`` whose all-reduce returns this rank's own partial sum."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_tp2_split_of_gated_deltanet(qwen3_5_models):
    """Each of two ranks holds one key head with its two value heads (conv channels cut to
    match, the state only its heads'): the ranks' partial outputs sum to the unsharded layer's,
    and their states are the unsharded state's heads. Three ranks for two key heads is a
    ValueError naming the head counts."""
    path = qwen3_5_models("qwen3_5")
    full = load_ours(path).model.layers[0]
    ranks = [load_ours(path, _Partial(r, 2)).model.layers[0] for r in range(2)]
    x = torch.randn(150, 64, generator=torch.Generator().manual_seed(3))
    outs, states = [], []
    for layer in [full, *ranks]:
        state = LayerState.empty(layer.cache_kind, 1, CPU)
        work = SeqWork(0, tuple(range(150)), 0, table(0), True, state_slot=0)
        meta = build_batch((work,), BLOCK, [None], 1, torch.float32, CPU).meta
        with torch.inference_mode():
            outs.append(layer.linear_attn(x, state, meta))
        states.append(state.tensors["ssm"][0])
    assert ranks[0].linear_attn.cache_kind.tensors[1][1] == (2, 16, 24)
    torch.testing.assert_close(outs[1] + outs[2], outs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(states[1:]), states[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 key heads"):
        load_ours(path, _Partial(0, 3))
    with pytest.raises(ValueError, match="linear_num_key_heads=2"):
        EngineConfig(ModelConfig.from_pretrained(path), ParallelConfig(tensor_parallel_size=4))


def test_conditional_generation_checkpoint_loads_text_part(tmp_path):
    """A Qwen3_5ForConditionalGeneration checkpoint (text config nested, weights under
    model.language_model.*, a vision tower under model.visual.*) gives transformers' text
    logits."""
    import transformers

    from conftest import QWEN3_5_SHAPE, randomise_qwen3_5

    cfg = transformers.Qwen3_5Config(
        text_config={**QWEN3_5_SHAPE, "intermediate_size": 96, "max_position_embeddings": 256},
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64))
    torch.manual_seed(0)
    hf = transformers.Qwen3_5ForConditionalGeneration(cfg).eval()
    randomise_qwen3_5(hf)
    hf.save_pretrained(tmp_path)
    model = load_ours(str(tmp_path))
    assert ModelConfig.from_pretrained(str(tmp_path)).multimodal
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([PROMPT[:100]])).logits[0]
    torch.testing.assert_close(Harness(model).feed(PROMPT[:100], [100]), ref, atol=ATOL, rtol=0)


def _config(tmp_path, **changes) -> str:
    raw = {"architectures": ["Qwen3_5ForCausalLM"], **{k: v for k, v in _base().items()}, **changes}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def _base() -> dict:
    from conftest import QWEN3_5_SHAPE

    return {**QWEN3_5_SHAPE, "intermediate_size": 96,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.25, "rope_type": "default",
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True}}


def test_config_fields_and_errors(tmp_path):
    cfg = ModelConfig.from_pretrained(_config(tmp_path, mtp_num_hidden_layers=1))
    assert (cfg.rotary_dim, cfg.rope_scaling, cfg.num_mtp_layers, cfg.num_nextn_predict_layers) == (8, None, 1, 0)
    bad = ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]
    with pytest.raises(ValueError, match="layer 1 has layer_types entry 'sliding_attention'"):
        ModelConfig.from_pretrained(_config(tmp_path, layer_types=bad))
    with pytest.raises(ValueError, match="layer_types lists 3 layers"):
        ModelConfig.from_pretrained(_config(tmp_path, layer_types=bad[:3]))
    with pytest.raises(ValueError, match="linear_num_value_heads=5 must be a multiple of linear_num_key_heads=2"):
        ModelConfig.from_pretrained(_config(tmp_path, linear_num_value_heads=5))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelConfig.from_pretrained(_config(tmp_path, rope_parameters={"partial_rotary_factor": 0.01}))
    with pytest.raises(ValueError, match="mtp_use_dedicated_embeddings"):
        ModelConfig.from_pretrained(_config(tmp_path, mtp_use_dedicated_embeddings=True))
    # a multimodal MoE checkpoint: the text config nested, the whole model's tie setting
    moe = {**_base(), "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
           "shared_expert_intermediate_size": 40, "mtp_num_hidden_layers": 1}
    del moe["intermediate_size"]
    cfg = ModelConfig.from_dict({"architectures": ["Qwen3_5MoeForConditionalGeneration"], "text_config": moe,
                                 "vision_config": {"depth": 1}, "tie_word_embeddings": True})
    assert cfg.multimodal and cfg.tie_word_embeddings and cfg.num_mtp_layers == 1
    assert (cfg.n_routed_experts, cfg.shared_expert_intermediate_size, cfg.moe_scoring) == (8, 40, "softmax")
    assert all(cfg.is_moe_layer(i) for i in range(4))
    # older configs: the layer pattern from full_attention_interval
    raw = {k: v for k, v in _base().items() if k != "layer_types"}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3_5ForCausalLM"], **raw,
                                                      "full_attention_interval": 2}))
    assert ModelConfig.from_pretrained(str(tmp_path)).layer_types == ("linear_attention", "full_attention") * 2


def test_every_layer_declares_its_cache_kind(tiny_models, qwen3_5_models):
    """Paged K/V for attention layers (Mistral's with its window, MLA's one shared latent) and a
    recurrent state for Gated DeltaNet layers, sized by this rank's heads."""
    mistral = load_ours(tiny_models("mistral"))
    assert mistral.model.layers[0].cache_kind == PagedKV(2, 16, torch.float32, window=12)
    mla = load_ours(tiny_models("deepseek_v3")).model.layers[0].cache_kind
    assert mla.shared_kv and mla.local_num_kv_heads == 1 and mla.head_dim == 32 + 16
    kinds = [layer.cache_kind for layer in load_ours(qwen3_5_models("qwen3_5")).model.layers]
    conv = 2 * 2 * 16 + 4 * 24
    assert kinds[0] == RecurrentState((("conv", (conv, 3), torch.float32), ("ssm", (4, 16, 24), torch.float32)),
                                      grid=64)
    assert kinds[3] == PagedKV(2, 32, torch.float32)
    assert state_bytes_per_seq(kinds) == 3 * 4 * (conv * 3 + 4 * 16 * 24)
    assert bytes_per_block(kinds, 1) == {"full": 2 * 2 * 32 * 4}
    assert isinstance(load_ours(qwen3_5_models("qwen3_5")).model.layers[0].linear_attn, Qwen3_5GatedDeltaNet)
