"""``graft-dflash``: the engine's tapped layer outputs (the drafter's context features) against
transformers, and a DFlash drafter trained on a tiny random Llama's own greedy continuations
reaching a stated acceptance floor in the engine's own speculative decoding (which an
untrained drafter stays far below), with output identical to plain decoding; and the
trainer's block forward equal to the engine's proposals with each slot's target aligned (the
floor alone would not see a target shifted by one position: the tiny model's continuations
repeat, so a drafter trained one token off still reaches it)."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from conftest import hf_model, make_tiny
from dist_engine import LLM, SamplingParams
from dist_engine.config import EngineArgs
from dist_engine.graft.data import load_features, save_hidden
from dist_engine.graft.dflash_train import dflash_teacher, graft_dflash
from dist_engine.graft.train import base_head

LAYERS = [1, 2]  # of the tiny model's 4
FLOOR = 1.8  # mean accepted length with K = 3 (an untrained drafter: ~1.02)
ENGINE = dict(skip_tokenizer_init=True, max_model_len=128)
SPEC = dict(speculative="dflash", num_speculative_tokens=3, min_draft_acceptance=0.0,
            speculative_disable_by_batch_size=0, speculative_config={"max_draft_tokens_per_step": 256})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny Llama (4 layers) and its greedy continuations of 300 fixed prompts, made with
    the tapped layers' outputs saved, as ``graft-dflash`` generates its answers."""
    root = tmp_path_factory.mktemp("dflash_graft")
    path = make_tiny("llama", str(root / "target"), num_hidden_layers=4)
    r = random.Random(0)
    prompts = [[1] + [r.randrange(3, 300) for _ in range(r.randrange(4, 12))] for _ in range(300)]
    with LLM(path, **ENGINE, hidden_state_layers=LAYERS) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
            temperature=0, max_tokens=40, ignore_eos=True, return_hidden_states=True))
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    save_hidden(str(root / "hidden"), "0", seqs, [o.outputs[0].hidden_states for o in outs], tuple(LAYERS))
    return path, root, prompts, seqs


def test_tapped_layers_match_transformers(data):
    """Rows ``[final-norm state | layer 1 | layer 2]`` of every verified position, through
    chunked prefill; the saved features and an engine prefill of the same answers agree."""
    path, root, prompts, seqs = data
    model = hf_model(path)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, return_hidden_states=True)
    with LLM(path, **ENGINE, hidden_state_layers=LAYERS, block_size=4, max_num_batched_tokens=5) as llm:
        outs = llm.generate(prompt_token_ids=prompts[:3], sampling_params=params)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            hs = model(torch.tensor([(p + o.outputs[0].token_ids)[:-1]]), output_hidden_states=True).hidden_states
        ref = torch.cat([hs[-1][0]] + [hs[i + 1][0] for i in LAYERS], -1)  # hs[i + 1]: layer i's output
        torch.testing.assert_close(o.outputs[0].hidden_states, ref, atol=1e-4, rtol=1e-4)
    head = base_head(path)
    rows = load_features(str(root / "hidden"), LAYERS)  # what the teacher pass reads back
    assert len(rows) == len(seqs) and rows[tuple(seqs[0])][1].shape == (len(seqs[0]) - 1, 2 * 72)
    second = load_features(str(root / "hidden"), [2])[tuple(seqs[0])][1]  # a subset of the saved layers
    assert torch.equal(second, rows[tuple(seqs[0])][1][:, 72:])
    saved = dflash_teacher(path, seqs[:4], LAYERS, head, str(root / "hidden"))
    fresh = dflash_teacher(path, seqs[:4], LAYERS, head)  # no saved rows: an engine prefill
    for (f1, y1), (f2, y2) in zip(saved, fresh):
        torch.testing.assert_close(f1[:-1].float(), f2[:-1].float(), atol=2e-3, rtol=2e-3)  # fp16 storage
        assert torch.equal(y1[:-1], y2[:-1]) and y1[-1] == -1
    with pytest.raises(ValueError, match="hidden_state_layers"):
        EngineArgs(model=path, hidden_state_layers=[7]).engine_config(path)


def spec_run(path: str, drafter: str, prompts, params):
    with LLM(path, **ENGINE, **SPEC, speculative_model=drafter) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        return [o.outputs[0].token_ids for o in outs], llm.engine.spec_stats


def test_trained_drafter_reaches_acceptance_floor(data, tmp_path):
    path, root, prompts, seqs = data
    lens = [len(p) for p in prompts]
    kw = dict(prompt_lens=lens, block_size=4, num_layers=1, target_layer_ids=LAYERS, lr=3e-3, batch_size=16,
              anchors=16, dtype="float32", draft_vocab_size=200, hidden_dir=str(root / "hidden"))
    untrained = str(tmp_path / "untrained")
    graft_dflash(path, seqs[:270], seqs[270:], untrained, epochs=0, **kw)
    trained = str(tmp_path / "trained")
    meta = graft_dflash(path, seqs[:270], seqs[270:], trained, epochs=8, **kw)
    cfg = json.load(open(os.path.join(trained, "config.json")))
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["block_size"] == 4
    assert cfg["dflash_config"]["target_layer_ids"] == LAYERS and cfg["base_fingerprint"]
    assert meta["draft_vocab_size"] == 200 and meta["draft_vocab_coverage"] > 0.9

    held = prompts[270:]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    got, stats = spec_run(path, trained, held, greedy)
    assert got == [s[n:] for s, n in zip(seqs[270:], lens[270:])]  # identical to plain greedy
    assert stats.mean_accepted_length >= FLOOR, stats.as_dict()
    # the report's estimate is the engine's greedy process, teacher-forced on the same answers
    estimate = meta["held_out"]["epoch_8"]["mean_accepted_length_per_k"][2]
    assert abs(estimate - stats.mean_accepted_length) < 0.15, (estimate, stats.as_dict())
    _, base = spec_run(path, untrained, held, greedy)
    assert base.mean_accepted_length < 1.2 < FLOOR, base.as_dict()

    seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=24, ignore_eos=True) for i in range(8)]
    with LLM(path, **ENGINE) as llm:
        plain = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=held[:8], sampling_params=seeded)]
    assert spec_run(path, trained, held[:8], seeded)[0] == plain


def test_drafter_for_other_weights_is_refused(data, tmp_path):
    path, root, prompts, seqs = data
    drafter = str(tmp_path / "drafter")
    graft_dflash(path, seqs[:20], seqs[290:], drafter, epochs=0, block_size=4, num_layers=1,
                 target_layer_ids=LAYERS, hidden_dir=str(root / "hidden"))
    other = make_tiny("llama", str(tmp_path / "other"), seed=1, num_hidden_layers=4)
    with pytest.raises(ValueError, match="trained on a different base model"):
        LLM(other, **ENGINE, **SPEC, speculative_model=drafter)
    with pytest.raises(ValueError, match="num_layers must be"):
        graft_dflash(path, seqs[:20], seqs[290:], drafter, num_layers=9)


def test_training_forward_equals_the_engines_proposals(data, tmp_path, dflash_blocks):
    """The trainer's block forward (``block_logits``) over a verified prefix equals the draft
    logits the engine computes for that block (context written from the taps, positions, the
    draft head), and slot k's target is the base's prediction after ``x[:a + k]``."""
    from safetensors.torch import load_file

    from dist_engine.config import ModelConfig
    from dist_engine.graft.dflash_model import GraftDFlash
    from dist_engine.graft.dflash_train import block_logits

    path, root, prompts, seqs = data
    lens = [len(p) for p in prompts]
    drafter = str(tmp_path / "drafter")
    graft_dflash(path, seqs[:270], seqs[270:], drafter, prompt_lens=lens, block_size=4, num_layers=2,
                 target_layer_ids=LAYERS, epochs=1, lr=3e-3, batch_size=16, anchors=16, dtype="float32",
                 draft_vocab_size=200, hidden_dir=str(root / "hidden"))
    blocks = dflash_blocks
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec = {**SPEC, "speculative_config": {**SPEC["speculative_config"], "draft_dtype": "float32"}}
    with LLM(path, **ENGINE, **spec, speculative_model=drafter) as llm:
        llm.generate(prompt_token_ids=[prompts[280]], sampling_params=greedy)
    text = seqs[280]
    w = load_file(os.path.join(drafter, "model.safetensors"))
    cfg = ModelConfig.from_pretrained(path)
    model = GraftDFlash(cfg, 2, LAYERS, 4, json.load(open(os.path.join(drafter, "config.json")))
                        ["dflash_config"]["mask_token_id"], 128)
    model.load_exported(w)
    head = base_head(path)
    [(feats, y)] = dflash_teacher(path, [text], LAYERS, head)
    x, f = torch.tensor([text]), feats[None].float()
    assert len(blocks) >= 3
    for [(P, token)], engine_logits in blocks:
        assert token == text[P]
        with torch.no_grad():
            logits, tgt = block_logits(model, model_embed(path), head[w["draft_vocab"]], x, f, y[None],
                                       torch.tensor([[P]]))
        torch.testing.assert_close(logits[0, 0], engine_logits[0], atol=2e-3, rtol=2e-3)
        want = [int(y[P + k - 1]) if P + k - 1 < len(text) else -1 for k in (1, 2, 3)]
        assert tgt[0, 0].tolist() == want


def model_embed(path: str) -> torch.Tensor:
    from dist_engine.graft.train import load_base

    return load_base(path)["model.embed_tokens.weight"].float()


def test_time_budget_stops_both_trainers(data, tmp_path):
    """``--time-budget`` (the equal-time comparison): training stops once its optimiser steps
    have taken the budget, long before the epochs asked for, and says so in the report."""
    from dist_engine.graft.train import graft

    path, root, prompts, seqs = data
    hidden = str(root / "hidden")
    d = graft_dflash(path, seqs[:270], seqs[270:], str(tmp_path / "dflash"), block_size=4, num_layers=1,
                     target_layer_ids=LAYERS, epochs=100, time_budget_s=1.0, eval_answers=4, hidden_dir=hidden)
    m = graft(path, seqs[:270], seqs[270:], str(tmp_path / "mtp"), epochs=100, batch_size=16,
              draft_vocab_size=320, time_budget_s=1.0, hidden_dir=hidden)
    for t in (d["training"], m["training"]):
        assert 1.0 <= t["train_seconds"] < 5.0 and t["time_budget_s"] == 1.0, t
    assert d["training"]["steps"] < 100 * 17 and "epoch_100" not in d["held_out"] and "epoch_100" not in m["held_out"]
