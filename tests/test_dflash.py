"""DFlash drafting (speculative method ``dflash``) with a tiny random drafter in the published
format, written here for a tiny random Gemma 4 target: the first block's draft logits inside
the engine against an independent reference written below (plain torch over transformers'
hidden states of the target), and speculative output identical to plain decoding for K = 1..3
(the block's size - 1), greedy and seeded."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from gemma4_tiny import make
from safetensors.torch import save_file

from dist_engine import LLM, SamplingParams
from dist_engine.config import EngineArgs, ModelConfig
from dist_engine.worker.spec_dflash import DFlashDecoder

PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4]
PROMPTS = [PROMPT, [1, 5, 6], [1, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 88, 87], PROMPT[:13] + [8, 8]]
ENGINE = dict(block_size=4, num_kv_blocks=64, max_model_len=128, enable_prefix_caching=False,
              skip_tokenizer_init=True, dtype="float32")
DRAFTER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10_000.0,
               block_size=4, input_embedding_scale=8.0)
LAYERS, MASK = [1, 3], 319  # target layers read (of 5); the mask token


def make_drafter(path: str, seed: int = 0, layers: list[int] = LAYERS, mask: int = MASK, vocab: int = 320,
                 **over) -> str:
    """A DFlash drafter as z-lab publishes them: config.json (DFlashDraftModel, dflash_config)
    and model.safetensors with every tensor random (norm weights spread around 1); ``over``
    changes DRAFTER's shape."""
    g = torch.Generator().manual_seed(seed)
    c = {**DRAFTER, **over}
    H, D, Hq, Hk, inter = (c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"],
                           c["intermediate_size"])
    shapes = {"fc.weight": (H, len(layers) * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (Hq * D, H), p + "self_attn.k_proj.weight": (Hk * D, H),
                       p + "self_attn.v_proj.weight": (Hk * D, H), p + "self_attn.o_proj.weight": (H, Hq * D),
                       p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
                       p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
                       p + "mlp.down_proj.weight": (H, inter), p + "input_layernorm.weight": (H,),
                       p + "post_attention_layernorm.weight": (H,)})
    tensors = {n: (1.0 + 0.3 * torch.randn(s, generator=g)) if len(s) == 1 else torch.randn(s, generator=g) * 0.1
               for n, s in shapes.items()}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    cfg = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", **c, "vocab_size": vocab,
           "dflash_config": {"target_layer_ids": layers, "mask_token_id": mask}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def reference_block_logits(path: str, target, prompt: list[int], token: int) -> torch.Tensor:
    """Draft logits ``[B - 1, vocab]`` of the block after ``prompt`` (first token ``token``),
    computed from the published format's definition with plain torch."""
    from safetensors.torch import load_file

    w = load_file(os.path.join(path, "model.safetensors"))
    c, B, P = DRAFTER, DRAFTER["block_size"], len(prompt)
    D, eps = c["head_dim"], c["rms_norm_eps"]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(x, pos):  # x [T, heads, D], rotate-half
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
        ang = pos[:, None].float() * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
        return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

    with torch.no_grad():
        hs = target(torch.tensor([prompt]), output_hidden_states=True, use_cache=False).hidden_states
        assert len(hs) == target.config.num_hidden_layers + 1  # [0]: the embeddings
        feats = torch.cat([hs[i + 1][0] for i in LAYERS], -1)  # [P, 2H]
        ctx = rms(feats @ w["fc.weight"].T, w["hidden_norm.weight"])
        emb = target.get_input_embeddings().weight  # raw rows (Gemma scales them only inside)
        x = emb[torch.tensor([token] + [MASK] * (B - 1))] * c["input_embedding_scale"]
        cpos, bpos = torch.arange(P), torch.arange(P, P + B)
        for i in range(c["num_hidden_layers"]):
            p = f"layers.{i}."
            h = rms(x, w[p + "input_layernorm.weight"])
            q = rms((h @ w[p + "self_attn.q_proj.weight"].T).view(B, -1, D), w[p + "self_attn.q_norm.weight"])
            k = rms((torch.cat([ctx, h]) @ w[p + "self_attn.k_proj.weight"].T).view(P + B, -1, D),
                    w[p + "self_attn.k_norm.weight"])
            v = (torch.cat([ctx, h]) @ w[p + "self_attn.v_proj.weight"].T).view(P + B, -1, D)
            q, k = rope(q, bpos), rope(k, torch.cat([cpos, bpos]))
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * D ** -0.5, -1)  # no mask at all
            x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(B, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) \
                @ w[p + "mlp.down_proj.weight"].T
        return rms(x, w["norm.weight"])[1:] @ target.lm_head.weight.T


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dflash")
    return make("dense", str(root / "target")), make_drafter(str(root / "drafter"))


def run(path: str, params, prompts=PROMPTS, **kw):
    """Outputs of ``prompts`` under ``params`` (a tuple: one batch per entry, one engine)."""
    with LLM(path, **ENGINE, **kw) as llm:
        got = [[o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=p)]
               for p in (params if isinstance(params, tuple) else (params,))]
        return (got if isinstance(params, tuple) else got[0]), llm.engine.spec_stats


def test_block_logits_match_reference(pair, dflash_blocks, oracle_drafts):
    """Every block a 12-token greedy request proposes: its draft logits equal the reference
    over the verified context (the drafter's cache written from the hooked layers' outputs)."""
    from transformers import Gemma4ForCausalLM

    path, drafter = pair
    blocks = dflash_blocks
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    [out], _ = run(path, params, prompts=[PROMPT])
    text = PROMPT + list(out)
    # drafts accepted (their context then written) and rejected
    oracle_drafts(DFlashDecoder, text)
    [got], stats = run(path, params, prompts=[PROMPT], speculative="dflash", speculative_model=drafter,
                       num_speculative_tokens=3, min_draft_acceptance=0.0)
    assert list(got) == list(out) and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert len(blocks) >= 3  # the block after the prompt and those after verification steps
    target = Gemma4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for [(P, token)], logits in blocks:
        # the context is every verified position before P (prompt, tokens and accepted drafts)
        assert token == text[P]
        torch.testing.assert_close(logits[0], reference_block_logits(drafter, target, text[:P], token),
                                   rtol=1e-4, atol=1e-4)


def test_speculative_output_equals_plain(pair):
    path, drafter = pair
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    seeded = [dataclasses.replace(greedy, temperature=0.8, seed=5 + i) for i in range(len(PROMPTS))]
    plain, _ = run(path, (greedy, seeded))
    for k in (1, 2, 3):
        got, stats = run(path, (greedy, seeded), speculative="dflash" if k % 2 else "auto",
                         speculative_model=drafter, num_speculative_tokens=k, min_draft_acceptance=0.0)
        assert got == plain, k  # (auto: the folder is a DFlash drafter)
        assert stats.num_draft_tokens > 0


def test_refusals(pair):
    path, drafter = pair
    mcfg = ModelConfig.from_pretrained(path)
    spec = EngineArgs(model=path, speculative_model=drafter, num_speculative_tokens=3).speculative_for(path, mcfg)
    assert (spec.method, spec.num_lookahead_slots) == ("dflash", 3)
    with pytest.raises(ValueError, match="exceeds what a DFlash block of 4 proposes"):
        LLM(path, **ENGINE, speculative="dflash", speculative_model=drafter, num_speculative_tokens=4)
