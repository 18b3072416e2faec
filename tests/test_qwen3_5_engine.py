"""Qwen3.5 through the engine (``LLM``: per-kind caches, state slots and checkpoints) and its
native MTP module (``mtp.*``): the MTP forward against an independent reference, speculative
output equal to plain decoding, context parallelism."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import hf_model
from dist_engine import LLM
from dist_engine.config import EngineArgs, ModelConfig
from dist_engine.distributed.comm import NullCommunicator
from dist_engine.models.mtp import MTPModel
from dist_engine.weights.loader import load_weights
from dist_engine.worker.batch import build_batch
from qwen3_5_harness import (  # noqa: F401  (one_thread: an autouse fixture)
    ATOL,
    BLOCK,
    BLOCKS_PER_SEQ,
    CPU,
    ENGINE,
    GREEDY,
    PROMPT,
    SEEDED,
    Harness,
    caches_for,
    engine_prompts,
    generate,
    load_ours,
    one_thread,
)


def _mtp_reference(path: str, prompt: list[int], draft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3.5's MTP module written independently: transformers' full-attention decoder layer
    and zero-centred RMSNorm over the test's ``mtp.*`` tensors; ``fc`` on [norm_e(embed(t[p+1])),
    norm_h(h[p])]. Raw outputs at every prompt position, then one chained step (fed the normed
    output of the last) at the next position."""
    from safetensors.torch import load_file
    from transformers.models.qwen3_5 import modeling_qwen3_5 as dense
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as moe

    base = hf_model(path)
    cfg = base.config
    w = load_file(os.path.join(path, "model-mtp.safetensors"))
    family = moe if "Moe" in type(base).__name__ else dense
    Qwen3_5RMSNorm = getattr(family, "Qwen3_5MoeRMSNorm", dense.Qwen3_5RMSNorm)
    decoder = getattr(family, "Qwen3_5MoeDecoderLayer", dense.Qwen3_5DecoderLayer)
    layer = decoder(cfg, cfg.layer_types.index("full_attention")).eval()
    layer.load_state_dict({k[len("mtp.layers.0."):]: v for k, v in w.items() if k.startswith("mtp.layers.0.")})
    norms = {}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norms[name] = Qwen3_5RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        norms[name].load_state_dict({"weight": w[f"mtp.{name}.weight"]})
    rope = getattr(family, "Qwen3_5MoeTextRotaryEmbedding", dense.Qwen3_5TextRotaryEmbedding)(cfg)

    def fc(ids: list[int], hidden: torch.Tensor) -> torch.Tensor:
        e = norms["pre_fc_norm_embedding"](base.model.embed_tokens(torch.tensor(ids)))
        return torch.cat([e, norms["pre_fc_norm_hidden"](hidden)], -1) @ w["mtp.fc.weight"].t()

    def block(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        pos = torch.arange(n).view(1, -1)
        mask = torch.full((n, n), float("-inf")).triu(1).view(1, 1, n, n)
        return layer(x.unsqueeze(0), position_embeddings=rope(x.unsqueeze(0), pos),
                     attention_mask=mask, position_ids=pos)[0]

    with torch.no_grad():
        h = base.model(torch.tensor([prompt])).last_hidden_state[0]  # [n, H], final-normed
        first = int(base.lm_head(h[-1]).argmax())
        x = fc(prompt[1:] + [first], h)
        g = block(x)
        x2 = torch.cat([x, fc([draft], norms["norm"](g[-1:]))])
        return g, block(x2)[-1]


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
def test_mtp_forward_matches_independent_reference(qwen3_5_models, name):
    """The MTP module loaded from ``mtp.*`` (MoE: fused experts) and driven as the speculative
    decoder drives it (``layer(positions, embed(t[p+1]), h[p], kv, meta)``, then
    ``layer.shared_head.norm`` before the shared head, chained on its normed output)."""
    path = qwen3_5_models(name)
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.num_mtp_layers == 1 and cfg.mtp_prefixes == ("mtp.",)
    main = load_ours(path)
    mtp = MTPModel(cfg, NullCommunicator(), torch.float32, 1024, emb_first=True)
    load_weights(mtp, path, select=lambda n: n.startswith(mtp.prefix()))
    layer = mtp.layer.eval()
    prompt = PROMPT[:70]
    h = Harness(main)
    b = build_batch((h.work(0, prompt, 0),), BLOCK, [None], h.heads_per_kv, torch.float32, CPU)
    kv = caches_for([layer], BLOCKS_PER_SEQ + 1, 1)[0]
    with torch.inference_mode():
        hidden = main(b.ids, b.positions, h.caches, b.meta)
        first = int(main.compute_logits(hidden[-1:]).argmax())
        ids = torch.tensor(prompt[1:] + [first])
        g = layer(b.positions, main.model.embed_tokens(ids), hidden, kv, b.meta)
        draft = int(main.compute_logits(layer.shared_head.norm(g[-1:])).argmax())
        b2 = build_batch((h.work(0, [draft], 70),), BLOCK, [None], h.heads_per_kv, torch.float32, CPU)
        g2 = layer(b2.positions, main.model.embed_tokens(torch.tensor([draft])),
                   layer.shared_head.norm(g[-1:]), kv, b2.meta)
    ref, ref2 = _mtp_reference(path, prompt, draft)
    torch.testing.assert_close(g, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(g2[0], ref2, atol=ATOL, rtol=0)


def test_missing_mtp_tensor_is_named(qwen3_5_models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = qwen3_5_models("qwen3_5")
    dst = tmp_path / "no_fc"
    shutil.copytree(src, dst)
    w = load_file(str(dst / "model-mtp.safetensors"))
    del w["mtp.pre_fc_norm_hidden.weight"]
    save_file(w, str(dst / "model-mtp.safetensors"))
    cfg = ModelConfig.from_pretrained(str(dst))
    mtp = MTPModel(cfg, NullCommunicator(), torch.float32, 64, emb_first=True)
    with pytest.raises(ValueError, match=r"mtp\.pre_fc_norm_hidden\.weight"):
        load_weights(mtp, str(dst), select=lambda n: n.startswith(mtp.prefix()))
    # --speculative auto: on where mtp.* tensors ship, off where the config only announces them
    assert EngineArgs(model=src).speculative_for(src, ModelConfig.from_pretrained(src)) is not None
    (dst / "model-mtp.safetensors").unlink()
    assert EngineArgs(model=str(dst)).speculative_for(str(dst), cfg) is None


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
def test_engine_matches_transformers_batched_and_cached(qwen3_5_models, qwen3_5_generated, name):
    """``LLM`` end to end: 32 greedy tokens = transformers'; a batch = each prompt alone (the
    last one resuming from the state the first saved after 64 tokens); the same prompts again
    (prefix-cache hits resuming from state checkpoints) = the first time."""
    prompts = engine_prompts()
    with LLM(qwen3_5_models(name), speculative="none", **ENGINE) as llm:
        solo = [generate(llm, [p], GREEDY)[0] for p in prompts]
        assert solo[0] == qwen3_5_generated(name)
        assert generate(llm, prompts, GREEDY) == solo
        again = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
        assert [o.outputs[0].token_ids for o in again] == solo
        assert [o.metrics.prefix_hit_tokens >= 64 for o in again] == [len(p) > 64 for p in prompts]


def test_engine_speculative_matches_plain(qwen3_5_models, monkeypatch):
    """Native MTP (``mtp.*``) drives the speculative decoder; output = plain decoding, greedy
    and seeded. The tiny MTP layer is random (its drafts are rejected), so a second run drafts
    plain decoding's own tokens, every fourth one wrong: drafts are accepted to every depth and
    rejected at every depth, and the recurrent state after each verification must be exactly
    the state after the accepted tokens for the output to stay the same."""
    from dist_engine.worker import spec_decode

    path = qwen3_5_models("qwen3_5")
    prompts = engine_prompts()
    with LLM(path, speculative="none", **ENGINE) as llm:
        plain = generate(llm, prompts, GREEDY)
        plain_seeded = generate(llm, prompts, SEEDED)
    with LLM(path, speculative="mtp", num_speculative_tokens=2, **ENGINE) as llm:
        assert generate(llm, prompts, GREEDY) == plain
        assert generate(llm, prompts, SEEDED) == plain_seeded
        assert llm.engine.spec_stats.num_draft_tokens > 0
    current: list[int] = []  # the prompt being generated and plain decoding's tokens after it

    def oracle(self, g, seqs, specs, positions):
        return [((current[p] + (p % 4 == 0)) % 320 if p < len(current) else 0) for p in positions]

    monkeypatch.setattr(spec_decode.MTPDecoder, "_draft", oracle)
    with LLM(path, speculative="mtp", num_speculative_tokens=3, min_draft_acceptance=0.0, **ENGINE) as llm:
        for p, out in zip(prompts, plain):
            current[:] = p + out
            assert generate(llm, [p], GREEDY) == [out]
        stats = llm.engine.spec_stats
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.mark.distributed
def test_cp2_runs_recurrent_layers_on_every_rank(qwen3_5_models, qwen3_5_generated, ray_session):
    """Under context parallelism the attention layer's K/V is split by block over the two
    ranks, while each rank runs every token through the Gated DeltaNet layers and holds the
    whole recurrent state (a long step's tokens are not split between ranks): output =
    transformers', with MTP speculation on."""
    with LLM(qwen3_5_models("qwen3_5"), context_parallel_size=2, speculative="mtp",
             num_speculative_tokens=2, **ENGINE) as llm:
        assert generate(llm, [PROMPT[:150]], GREEDY) == [qwen3_5_generated("qwen3_5")]
