"""MTP self-speculative decoding: identical output to plain decoding, the MTP forward against an
independent reference, native DeepSeek-named MTP weights, grafting, and exact sampling."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

import pytest
import torch

from conftest import hf_model
from dist_engine import LLM, SamplingParams

ARGS = dict(skip_tokenizer_init=True, max_model_len=160, num_kv_blocks=200, block_size=4)
rng = random.Random(5)
PROMPTS = [[1] + [rng.randrange(3, 320) for _ in range(rng.randrange(2, 30))] for _ in range(8)]
LENS = [rng.randrange(5, 40) for _ in PROMPTS]


def spec(folder: str, k: int, **kw) -> dict:
    """K drafts every step unless a test asks for the adaptive depth (test_draft_depth_*)."""
    return {"method": "mtp", "model": folder, "num_speculative_tokens": k,
            "min_draft_acceptance": 0.0, **kw}


def mixed_params() -> list[SamplingParams]:
    """Greedy and seeded sampling with masks, penalties and min_tokens, mixed in one batch."""
    out = []
    for i, n in enumerate(LENS):
        if i % 2 == 0:
            out.append(SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        else:
            out.append(SamplingParams(temperature=0.8, top_k=[0, 50, 0, 20][i // 2], top_p=0.9,
                                      seed=i, max_tokens=n, min_tokens=min(n, 6),
                                      repetition_penalty=1.3 if i == 3 else 1.0,
                                      presence_penalty=0.5 if i == 5 else 0.0))
    return out


def run(path: str, params, prompts=PROMPTS, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, **{**ARGS, **kw})
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return [o.outputs[0].token_ids for o in outs], llm


def test_graft_beats_untrained_and_repeat_baseline(grafted):
    _, folder, meta = grafted
    ho = meta["held_out"]
    trained = ho["epoch_5"]["accuracy_per_depth"]
    assert trained[0] > ho["untrained"]["accuracy_per_depth"][0] + 0.05
    assert trained[0] > ho["epoch_5"]["repeat_last_token_accuracy"]
    assert all(a > u for a, u in zip(trained, ho["untrained"]["accuracy_per_depth"]))
    cfg = json.load(open(os.path.join(folder, "mtp_config.json")))
    assert cfg["base_fingerprint"] and cfg["concat_order"] == "emb_hidden"


def test_graft_continues_from_a_graft_of_the_same_base(grafted, tmp_path):
    from dist_engine.graft.train import graft

    path, folder, meta = grafted
    seqs = json.load(open(os.path.join(folder, "seqs.json")))
    kw = dict(epochs=1, depth=3, lr=1e-3, batch_size=16, draft_vocab_size=320, dtype="float32")
    kw["hidden_dir"] = os.path.join(folder, "hidden")  # the same teacher signal as the first graft
    more = graft(path, seqs[:450], seqs[450:], str(tmp_path / "more"), init_from=folder, **kw)
    ho = more["held_out"]
    # starts exactly where the first graft ended (same data, vocabulary and fp32 weights)
    assert ho["initial"]["accuracy_per_depth"] == meta["held_out"]["epoch_5"]["accuracy_per_depth"]
    assert ho["initial"]["accuracy_per_depth"][0] > ho["untrained"]["accuracy_per_depth"][0] + 0.05
    assert len(ho["epoch_1"]["train_subset_accuracy_per_depth"]) == 3
    assert more["training"]["initialised_from"]["epochs"] == 5
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    cfg = json.load(open(other / "mtp_config.json"))
    json.dump({**cfg, "base_fingerprint": "0" * 64}, open(other / "mtp_config.json", "w"))
    with pytest.raises(ValueError, match="different base model"):
        graft(path, seqs[:450], seqs[450:], str(tmp_path / "refused"), init_from=str(other), **kw)


def test_graft_with_raw_feedback_is_recorded_and_lossless(grafted, tmp_path):
    """A graft whose chained steps feed the raw MTP output records it; the engine then chains
    that way too (speculation stays lossless), and continuing it with the other feedback is
    refused."""
    from dist_engine.graft.train import graft

    path, folder, _ = grafted
    seqs = json.load(open(os.path.join(folder, "seqs.json")))
    kw = dict(epochs=2, depth=3, lr=3e-3, batch_size=16, draft_vocab_size=320, dtype="float32",
              hidden_dir=os.path.join(folder, "hidden"))
    out = str(tmp_path / "raw")
    meta = graft(path, seqs[:450], seqs[450:], out, feedback="raw", **kw)
    assert meta["feedback"] == "raw"
    ho = meta["held_out"]
    assert ho["epoch_2"]["accuracy_per_depth"][2] > ho["untrained"]["accuracy_per_depth"][2] + 0.05
    with pytest.raises(ValueError, match="feedback='raw'"):
        graft(path, seqs[:450], seqs[450:], str(tmp_path / "mixed"), init_from=out, **kw)
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected, llm = run(path, p, prompts=PROMPTS[:2])
    llm.shutdown()
    got, llm = run(path, p, prompts=PROMPTS[:2], speculative_config=spec(out, 3))
    with llm:
        assert llm.engine.config.speculative.feedback == "raw"
        assert got == expected and llm.engine.spec_stats.num_accepted_tokens > 0


def test_teacher_signal_matches_transformers(grafted):
    """graft-mtp's teacher signal, saved while the engine generated the answers or taken from a
    prefill of them, equals transformers' pass over the answers: hidden states to fp32 rounding
    and the same greedy predictions (while generating, an answer's last token is never run: no
    target there)."""
    from dist_engine.graft.train import teacher_pass

    path, folder, _ = grafted
    seqs = json.load(open(os.path.join(folder, "seqs.json")))[:20]
    saved = teacher_pass(path, seqs, None, os.path.join(folder, "hidden"))
    prefilled = teacher_pass(path, seqs)
    model = hf_model(path)
    for s, (hs, ys), (hp, yp) in zip(seqs, saved, prefilled):
        with torch.inference_mode():
            h = model.model(torch.tensor([s])).last_hidden_state[0]  # [L, H]
            y = model.lm_head(h).argmax(-1)
        assert hs.shape == hp.shape == h.shape == (len(s), h.shape[-1])
        torch.testing.assert_close(hp, h, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hs[:-1], h[:-1], atol=1e-4, rtol=1e-4)
        assert torch.equal(yp, y) and torch.equal(ys[:-1], y[:-1]) and ys[-1] == -1


def test_hidden_states_with_speculation_equal_plain(grafted):
    """Rows of rejected drafts are dropped: a speculative request gets the same hidden states
    as plain decoding gives it, greedy and seeded."""
    path, folder, _ = grafted
    params = [dataclasses.replace(p, return_hidden_states=True) for p in mixed_params()]

    def outputs(**kw):
        with LLM(path, **ARGS, **kw) as llm:
            return [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)]

    plain = outputs()
    fast = outputs(speculative_config=spec(folder, 3, max_draft_tokens_per_step=0))
    for p, a, b in zip(PROMPTS, plain, fast):
        assert a.token_ids == b.token_ids
        assert a.hidden_states.shape[0] == len(p) + len(a.token_ids) - 1
        torch.testing.assert_close(b.hidden_states, a.hidden_states, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_speculative_output_identical_to_plain(grafted, k):
    path, folder, _ = grafted
    params = mixed_params()
    expected, llm = run(path, params)
    llm.shutdown()
    got, llm = run(path, params, speculative_config=spec(folder, k, max_draft_tokens_per_step=0))
    with llm:
        assert got == expected
        stats = llm.engine.spec_stats
        assert stats.num_accepted_tokens > 0 and len(stats.per_position) == k
        assert llm.engine.blocks.num_free == ARGS["num_kv_blocks"]


@pytest.mark.parametrize("k", [1, 3])
def test_verification_through_the_static_decode_path(grafted, monkeypatch, k):
    """Verification steps and the MTP layer's runs (catch-up, chained drafts) go through the
    static-shape decode path that CUDA graphs record (run eagerly on CPU here), each fed token a
    row of its own: greedy and seeded output still equal plain decoding, each of those requests
    drafts and accepts exactly what it does on the normal path (so the MTP rows see the right
    keys), an unseeded request is verified by rejection sampling, no block leaks."""
    from dist_engine.worker import cuda_graph

    path, folder, _ = grafted
    params = [dataclasses.replace(p, seed=None) if i == 5 else p for i, p in enumerate(mixed_params())]
    expected, llm = run(path, params, seed=3)
    llm.shutdown()
    cfg = spec(folder, k, max_draft_tokens_per_step=0, disable_by_batch_size=0)

    def speculate(static: bool):
        monkeypatch.setattr(cuda_graph, "STATIC_DECODE_ON_CPU", static)
        with LLM(path, **ARGS, seed=3, speculative_config=cfg) as llm:
            outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)
            assert llm.engine.blocks.num_free == ARGS["num_kv_blocks"]
            graphs = llm.engine.executor.worker.runner.graphs
            runs = graphs.num_mtp_runs if graphs is not None else 0
        return [o.outputs[0].token_ids for o in outs], [o.metrics.spec.as_dict() for o in outs], runs

    real_forward, verify_rows = cuda_graph.DecodeGraphs.forward, []

    def spy(self, seqs):
        out = real_forward(self, seqs)
        if out is not None and any(s.num_drafts for s in seqs):
            verify_rows.append(out.shape[0])
        return out

    monkeypatch.setattr(cuda_graph.DecodeGraphs, "forward", spy)
    _, eager_stats, _ = speculate(False)
    got, stats, mtp_runs = speculate(True)
    same = [i for i in range(len(PROMPTS)) if i != 5]
    assert [got[i] for i in same] == [expected[i] for i in same] and len(got[5]) == LENS[5]
    assert [stats[i] for i in same] == [eager_stats[i] for i in same]
    assert sum(st["num_accepted_tokens"] for st in stats) > 0
    # most steps verified drafts through the path, several sequences of K + 1 rows at once, and
    # the MTP layer ran through it about K times a step (catch-up, then K - 1 chained drafts)
    assert len(verify_rows) >= 10 and max(verify_rows) >= 4 * (k + 1)
    assert mtp_runs >= k * len(verify_rows)


def test_batch_one_and_stats(grafted):
    path, folder, _ = grafted
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected, llm = run(path, p, prompts=[PROMPTS[0]])
    llm.shutdown()
    with LLM(path, **ARGS, speculative_config=spec(folder, 3)) as llm:
        out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=p)[0]
        assert out.outputs[0].token_ids == expected[0]
        s = out.metrics.spec
        # 40 tokens: 1 from the prefill step, the rest from verification steps (the last one or
        # two steps carry no drafts: nothing is left to speculate on)
        assert 37 <= s.num_steps + s.num_accepted_tokens <= 39
        assert s.mean_accepted_length > 1.0 and sum(s.histogram) == s.num_steps
        assert llm.engine.stats()["spec_decode"]["num_draft_tokens"] == s.num_draft_tokens


def test_drafts_follow_the_rows_bans_and_penalties(grafted, monkeypatch):
    """A draft row is built like the verifier's row at that position: while min_tokens bans a
    stop token it is never drafted (over the reduced draft vocabulary too, and for greedy,
    seeded and unseeded rows), and output still equals plain decoding."""
    from dist_engine.worker import spec_decode

    path, folder, _ = grafted
    drafted = []
    real = spec_decode.MTPDecoder._draft

    def recording(self, *a, **kw):
        out = real(self, *a, **kw)
        drafted.extend(out)
        return out

    monkeypatch.setattr(spec_decode.MTPDecoder, "_draft", recording)
    cfg = spec(folder, 3, max_draft_tokens_per_step=0, draft_vocab_size=100)
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    run(path, plain, prompts=PROMPTS[:4], speculative_config=cfg)[1].shutdown()
    often = max(set(drafted), key=drafted.count)  # the token drafted most without a ban
    params = [dataclasses.replace(plain, stop_token_ids=(often,), min_tokens=30, repetition_penalty=r, **kw)
              for r, kw in ((1.0, {}), (1.5, {}), (1.0, dict(temperature=0.8, seed=2)),
                            (1.3, dict(temperature=0.8, seed=None)))]
    expected, llm = run(path, params[:3], prompts=PROMPTS[:3])
    llm.shutdown()
    drafted.clear()
    got, llm = run(path, params, prompts=PROMPTS[:4], speculative_config=cfg)
    with llm:
        assert got[:3] == expected and len(got[3]) == 30
        assert llm.engine.spec_stats.num_accepted_tokens > 0
    assert drafted and often not in drafted


def test_preemption_prefix_hits_and_n(grafted):
    path, folder, _ = grafted
    shared = PROMPTS[0] + [7, 8, 9]
    prompts = [PROMPTS[0], shared, PROMPTS[2], PROMPTS[0]]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, n=3, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=4, max_tokens=30, ignore_eos=True)]
    small = dict(num_kv_blocks=40, max_model_len=64)

    def outputs(llm):
        return [[c.token_ids for c in o.outputs]
                for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]

    with LLM(path, **{**ARGS, **small}) as llm:
        expected = outputs(llm)
    with LLM(path, **{**ARGS, **small}, speculative_config=spec(folder, 3, max_draft_tokens_per_step=0)) as llm:
        assert outputs(llm) == expected
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.blocks.prefix_hit_tokens > 0
        assert llm.engine.blocks.num_free == 40


def test_draft_budget_lowers_k_and_abort_frees(grafted):
    path, folder, _ = grafted
    params = mixed_params()
    expected, llm = run(path, params)
    llm.shutdown()
    # 8 sequences x K=3 > 8 drafts per step: K drops to 1 while all eight run
    with LLM(path, **ARGS, speculative_config=spec(folder, 3, max_draft_tokens_per_step=8)) as llm:
        assert llm.engine._spec_k(8) == (1, 1) and llm.engine._spec_k(2) == (3, 3)
        assert llm.engine._spec_k(9) == (0, 0)
        got = [o.outputs[0].token_ids
               for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)]
        assert got == expected
        eng = llm.engine
        eng.add_request("a", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
        for _ in range(4):
            eng.step()
        eng.abort_request("a")
        assert eng.blocks.num_free == ARGS["num_kv_blocks"]


@pytest.mark.distributed
def test_tp2_speculative_matches_plain(grafted, ray_session):
    """Greedy and seeded rows equal plain decoding at TP=2; two unseeded rows (rejection
    sampling) ride along: the executor fails the step if the ranks ever draw differently."""
    path, folder, _ = grafted
    unseeded = (1, 5)
    params = [dataclasses.replace(p, seed=None) if i in unseeded else p for i, p in enumerate(mixed_params())]
    expected, llm = run(path, params)
    llm.shutdown()
    got, llm = run(path, params, tensor_parallel_size=2,
                   speculative_config=spec(folder, 3, max_draft_tokens_per_step=0))
    with llm:
        assert [g for i, g in enumerate(got) if i not in unseeded] == [
            e for i, e in enumerate(expected) if i not in unseeded]
        assert [len(got[i]) for i in unseeded] == [LENS[i] for i in unseeded]
        assert llm.engine.spec_stats.num_accepted_tokens > 0


def _reference_mtp(path: str, folder: str, prompt: list[int], draft1: int):
    """MTP outputs at the last prompt position and one chained step, written independently
    with transformers' LlamaDecoderLayer (transformers has no MTP layer)."""
    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    base = hf_model(path)
    cfg = base.config
    w = {k.split(".", 3)[3]: v.float() for k, v in load_file(os.path.join(folder, "mtp.safetensors")).items()
         if k.startswith("model.layers.")}
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    layer.load_state_dict({k: v for k, v in w.items()
                           if k.startswith(("self_attn", "mlp", "input_", "post_"))})

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def step_input(emb_ids, hidden):
        e = rms(base.model.embed_tokens(torch.tensor(emb_ids)), w["enorm.weight"])
        return torch.cat([e, rms(hidden, w["hnorm.weight"])], -1) @ w["eh_proj.weight"].t()

    with torch.no_grad():
        n = len(prompt)
        h = base.model(torch.tensor([prompt])).last_hidden_state[0]  # [n, H] after the final norm
        # slot p reads h[p] and token p + 1; the last prompt slot reads the first sampled token
        first = int(base.lm_head(h[-1]).argmax())
        x = step_input(prompt[1:] + [first], h)  # [n, H]
        rope = LlamaRotaryEmbedding(cfg)

        def block(x):
            pos = torch.arange(x.shape[0]).view(1, -1)
            mask = torch.full((x.shape[0],) * 2, float("-inf")).triu(1).view(1, 1, *(x.shape[0],) * 2)
            return layer(x.unsqueeze(0), attention_mask=mask, position_ids=pos,
                         position_embeddings=rope(x.unsqueeze(0), pos))[0]

        g = block(x)  # [n, H]
        fed = rms(g[-1], w["shared_head.norm.weight"])  # normed feedback
        x2 = torch.cat([x, step_input([draft1], fed.unsqueeze(0))])
        g2 = block(x2)
    assert g.shape[0] == n
    return g[-1], g2[-1]


def test_mtp_forward_matches_independent_reference(grafted):
    path, folder, _ = grafted
    prompt = PROMPTS[0]
    # fp32 weights on the draft path, as in the reference (by default they are bf16)
    with LLM(path, **ARGS, speculative_config=spec(folder, 2, draft_dtype="float32")) as llm:
        dec = llm.engine.executor.worker.runner.drafter
        seen = []
        original = dec._draft

        def capture(g, *rest):
            seen.append(g.clone())
            return original(g, *rest)

        dec._draft = capture
        eng = llm.engine
        eng.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        eng.step()  # prefill: first token, then the MTP layer drafts twice
        draft1 = eng.requests["r"].seqs[0].draft_token_ids[0]
        ref1, ref2 = _reference_mtp(path, folder, prompt, draft1)
        torch.testing.assert_close(seen[0][0], ref1, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(seen[1][0], ref2, atol=2e-4, rtol=1e-4)


def test_native_deepseek_named_mtp_weights(grafted, tmp_path):
    """A checkpoint that ships its MTP layer (num_nextn_predict_layers, model.layers.{L}.*,
    with the embed/head copies DeepSeek-V3 stores) loads and speculates losslessly."""
    from safetensors.torch import load_file, save_file

    path, folder, _ = grafted
    native = tmp_path / "native"
    shutil.copytree(path, native)
    cfg = json.load(open(native / "config.json"))
    cfg["num_nextn_predict_layers"] = 1
    json.dump(cfg, open(native / "config.json", "w"))
    mtp = {k: v for k, v in load_file(os.path.join(folder, "mtp.safetensors")).items()
           if k.startswith("model.layers.")}
    emb = load_file(os.path.join(path, "model.safetensors"))["model.embed_tokens.weight"]
    mtp["model.layers.2.embed_tokens.weight"] = emb
    mtp["model.layers.2.shared_head.head.weight"] = emb.clone()
    save_file(mtp, str(native / "model-mtp.safetensors"))
    params = mixed_params()
    expected, llm = run(path, params)
    llm.shutdown()
    got, llm = run(str(native), params, speculative_config={"num_speculative_tokens": 2})
    with llm:
        assert got == expected
        assert llm.engine.spec_stats.num_accepted_tokens > 0
    with pytest.raises(ValueError, match="no MTP layer"):
        LLM(path, **ARGS, speculative_config={"num_speculative_tokens": 2})


def test_graft_for_other_weights_is_refused(grafted, tiny_models):
    _, folder, _ = grafted
    with pytest.raises(ValueError, match="different base model"):
        LLM(tiny_models("llama1kv"), **ARGS, speculative_config=spec(folder, 2))


V_TOY, T_TOY = 4, 0.9
_gen = torch.Generator().manual_seed(0)
TABLE_P = torch.randn(V_TOY, V_TOY, generator=_gen) * 1.5  # next-token logits given the last
TABLE_Q = TABLE_P + torch.randn(V_TOY, V_TOY, generator=_gen) * 1.5  # a different draft model


def toy_step(scheme: str, seed: int, last: int, pos: int, k: int, check: bool = True) -> list[int]:
    """One speculative step on the sampler alone: k drafts chained from TABLE_Q after token
    ``last``, verified against TABLE_P; returns the emitted tokens (``check=False``: the drafts
    accepted unchecked, the negative control)."""
    from dist_engine.worker.messages import SamplingSpec
    from dist_engine.worker.rejection import PendingDrafts, draw_drafts, target_logits, verify
    from dist_engine.worker.sampler import sample
    from dist_engine.worker.spec_rows import accept_drafts, pick_draft, row_spec

    spec = SamplingSpec(temperature=T_TOY, seed=seed, seeded=scheme == "gumbel")
    pending = PendingDrafts(pos, [], [], [])
    prev = last
    for j in range(k):
        if scheme == "gumbel":
            d = pick_draft(TABLE_Q[prev], spec, pos + j, V_TOY)
        else:
            (d,), q = draw_drafts(TABLE_Q[prev].view(1, -1), [spec], [pos + j])
            pending.index.append(d)
            pending.q.append(q[0])
        pending.tokens.append(d)
        prev = d
    drafts = tuple(pending.tokens)
    if not check:
        return list(drafts)
    ctx = [last, *drafts]
    logits = torch.stack([TABLE_P[ctx[j]] for j in range(k + 1)]).clone()
    specs = [row_spec(spec, drafts[:j]) for j in range(k + 1)]
    targets, _, _ = sample(logits, specs, [pos + j for j in range(k + 1)])
    if scheme == "gumbel":
        a = accept_drafts(drafts, targets)
        return targets[:a + 1]
    a, tok = verify(pending, drafts, target_logits(logits[:k], specs[:k]), spec, None)
    return [*drafts[:a], tok if tok is not None else targets[k]]


@pytest.mark.parametrize("scheme", ["gumbel", "rejection"])
def test_speculative_sampling_joint_distribution_with_negative_control(scheme):
    """On the sampler alone: draft 3 tokens from q, verify against p (the Gumbel scheme of seeded
    requests, or rejection sampling), repeat until 3 tokens are out; their joint distribution is
    p's (fresh seed per trial). Accepting drafts unchecked (the negative control) gives q's and
    fails the same test."""
    from test_sampler import chi_square_p

    lp = torch.log_softmax(TABLE_P / T_TOY, -1)
    probs = {(a, b, c): float((lp[0, a] + lp[a, b] + lp[b, c]).exp())
             for a in range(V_TOY) for b in range(V_TOY) for c in range(V_TOY)}
    cells = sorted(probs)
    for check, ok in ((True, True), (False, False)):
        counts = dict.fromkeys(cells, 0)
        r = random.Random(1 if check else 2)
        for _ in range(3000):
            seed, out, pos = r.getrandbits(40), [0], 1  # context: token 0 at position 0
            while len(out) < 4:
                emitted = toy_step(scheme, seed, out[-1], pos, 3, check)
                out.extend(emitted)
                pos += len(emitted)
            counts[tuple(out[1:4])] += 1
        p = chi_square_p([counts[c] for c in cells], [probs[c] for c in cells])
        assert (p > 1e-3) if ok else (p < 1e-6), (check, p)


def gumbel_coupling_acceptance(p: torch.Tensor, q: torch.Tensor) -> float:
    """P(argmax(log p + g) == argmax(log q + g)) for shared Gumbel noise g: token i wins both
    when every g_j - g_i stays below min(log(p_i / p_j), log(q_i / q_j)), which is token i
    winning a Gumbel race with weights max(p_j / p_i, q_j / q_i); so sum_i 1 / sum_j of those."""
    ratios = torch.maximum(p.view(1, -1) / p.view(-1, 1), q.view(1, -1) / q.view(-1, 1))  # [i, j]
    return float((1.0 / ratios.sum(-1)).sum())


def test_rejection_sampling_acceptance_is_sum_of_min_p_q():
    """A first draft is accepted with probability sum_v min(p(v), q(v)) under rejection sampling,
    and with the (never larger) coupling probability under the Gumbel scheme."""
    n = 4000
    for last in range(V_TOY):
        p = torch.softmax(TABLE_P[last] / T_TOY, -1)
        q = torch.softmax(TABLE_Q[last] / T_TOY, -1)
        expected = {"rejection": float(torch.minimum(p, q).sum()),
                    "gumbel": gumbel_coupling_acceptance(p, q)}
        assert expected["gumbel"] <= expected["rejection"] + 1e-6
        for scheme, want in expected.items():
            r = random.Random(last)
            hits = sum(len(toy_step(scheme, r.getrandbits(40), last, 1, 1)) == 2 for _ in range(n))
            se = (want * (1 - want) / n) ** 0.5
            assert abs(hits / n - want) < 4 * se, (scheme, last, hits / n, want)


def test_unseeded_requests_use_rejection_sampling(grafted, monkeypatch):
    """Unseeded sampled requests are verified by rejection sampling (over a reduced draft
    vocabulary here); greedy and seeded requests in the same batch still equal plain decoding.
    With ``unseeded_acceptance="gumbel"`` unseeded requests give exactly the plain tokens of
    their admission seeds (same engine seed)."""
    from dist_engine.worker import speculative

    path, folder, _ = grafted
    params = [dataclasses.replace(p, seed=None) if i in (1, 5) else p for i, p in enumerate(mixed_params())]
    expected, llm = run(path, params, seed=7)
    llm.shutdown()
    calls = []
    real_verify = speculative.verify

    def counting_verify(*a, **kw):
        out = real_verify(*a, **kw)
        calls.append(out)
        return out

    monkeypatch.setattr(speculative, "verify", counting_verify)
    cfg = spec(folder, 3, max_draft_tokens_per_step=0, draft_vocab_size=100)
    got, llm = run(path, params, seed=7, speculative_config=cfg)
    with llm:
        assert [g for i, g in enumerate(got) if i not in (1, 5)] == [
            e for i, e in enumerate(expected) if i not in (1, 5)]
        assert [len(got[i]) for i in (1, 5)] == [LENS[1], LENS[5]]
        assert llm.engine.blocks.num_free == ARGS["num_kv_blocks"]
    assert calls and any(tok is not None for _, tok in calls) and any(a > 0 for a, _ in calls)
    got, llm = run(path, params, seed=7, speculative_config={**cfg, "unseeded_acceptance": "gumbel"})
    llm.shutdown()
    assert got == expected


@pytest.mark.slow
def test_rejection_sampling_in_engine_gives_the_target_distribution(grafted):
    """The engine's whole rejection path (drafts drawn over a reduced vocabulary, accepted with
    p / q, residual draws): the second token of 3000 unseeded completions of one prompt follows
    the plain model's marginal sum_t1 p(t1) p(t2 | t1) (computed with transformers), and fails
    a wrong temperature's (the negative control)."""
    from test_sampler import pooled_chi_square_p

    path, folder, _ = grafted
    prompt, temp, n = PROMPTS[3][:8], 0.8, 3000
    model = hf_model(path)
    with torch.inference_mode():
        first = model(torch.tensor([prompt])).logits[0, -1]  # [V]
        V = len(first)
        nxt = model(torch.tensor([prompt + [t] for t in range(V)])).logits[:, -1]  # [V, V]

    def marginal(t: float) -> torch.Tensor:  # [V]: P(token 2) at temperature t
        return torch.softmax(first / t, -1) @ torch.softmax(nxt / t, -1)

    cfg = spec(folder, 2, max_draft_tokens_per_step=0, disable_by_batch_size=0, draft_vocab_size=100)
    with LLM(path, **{**ARGS, "num_kv_blocks": 6000}, speculative_config=cfg) as llm:
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            temperature=temp, n=n, max_tokens=3, ignore_eos=True))[0]
        stats = llm.engine.stats()["spec_decode"]
    assert stats["num_accepted_tokens"] > 0
    counts = torch.bincount(torch.tensor([c.token_ids[1] for c in out.outputs]), minlength=V)
    for t, ok in ((temp, True), (temp * 1.5, False)):
        p = pooled_chi_square_p(counts, marginal(t))
        assert (p > 1e-3) if ok else (p < 1e-6), (t, p)


@pytest.mark.slow
def test_grpc_reports_speculation(grafted):
    """A speculating server: same tokens as plain greedy; acceptance in the final message, the
    model info, the server stats and the Prometheus metrics."""
    import urllib.request

    from test_grpc import start_server

    from dist_engine.client import Client
    from dist_engine.v1 import generation_pb2 as pb

    path, folder, _ = grafted
    expected, llm = run(path, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        prompts=[PROMPTS[0]])
    llm.shutdown()
    proc, target, metrics_port = start_server(path, "--speculative-model", folder,
                                              "--num-speculative-tokens", "3")
    try:
        with Client(target) as c:
            msgs = list(c.generate(token_ids=PROMPTS[0], temperature=0, max_tokens=30,
                                   ignore_eos=True))
            assert [t for m in msgs for t in m.token_ids] == expected[0]
            final = msgs[-1].speculative
            assert final.num_draft_tokens > 0 and final.mean_accepted_length > 1.0
            assert len(final.per_position_acceptance) == 3
            info = c.stub.GetModelInfo(pb.GetModelInfoRequest())
            assert (info.speculative_method, info.num_speculative_tokens) == ("mtp", 3)
            stats = c.stub.GetServerStats(pb.GetServerStatsRequest())
            assert stats.speculative.num_accepted_tokens >= final.num_accepted_tokens  # + warm-up
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        line = next(x for x in text.splitlines()
                    if x.startswith("dist_engine:spec_decode_num_accepted_tokens_total "))
        assert float(line.split()[1]) == stats.speculative.num_accepted_tokens
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_draft_depth_follows_acceptance():
    from dist_engine.engine.draft_depth import DraftDepth

    d = DraftDepth(3, 0.1, alpha=0.1, probe_every=4)
    r = random.Random(0)
    for _ in range(60):  # the first draft is taken 40% of the time, never the later ones
        d.record(3, 1 if r.random() < 0.4 else 0)
    limits = [d.limit() for _ in range(8)]
    assert limits == [1, 1, 1, 3, 1, 1, 1, 3]  # every 4th step probes all three positions
    for _ in range(60):  # now everything is accepted: the depth comes back
        d.record(3, 3)
    assert [d.limit() for _ in range(3)] == [3, 3, 3]
    for _ in range(60):
        d.record(1, 0)
    assert [d.limit() for _ in range(4)] == [3, 0, 0, 0]  # the 12th call probes
    assert DraftDepth(3, 0.0).limit() == 3
    # a third draft accepted ~20% of the time, then a run of 8 misses: the default slow
    # average keeps it, a fast one (0.1) would switch it off until a probe hits
    for alpha, want in ((0.03, 3), (0.1, 2)):
        d = DraftDepth(3, 0.1, alpha=alpha)
        d.rate = [0.6, 0.3, 0.2]
        for _ in range(8):
            d.record(3, 2)
        assert [d.limit() for _ in range(7)] == [want] * 7
    assert (DraftDepth(3, 0.1).alpha, DraftDepth(3, 0.1).probe_every) == (0.03, 8)
    with pytest.raises(ValueError, match="min_acceptance"):
        DraftDepth(3, 1.5)


def test_speculation_off_for_sequences_admitted_under_load(grafted):
    """Sequences admitted while more than ``disable_by_batch_size`` are in the engine run plain:
    no drafts, no MTP catch-up, no lookahead blocks, and prefix-cache blocks that only such
    sequences share (theirs lack the MTP layer's K/V). A request admitted alone speculates."""
    from dist_engine.config import SpeculativeConfig

    path, folder, _ = grafted
    params = mixed_params()
    expected, llm = run(path, params)
    llm.shutdown()
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    alone, llm = run(path, p, prompts=[PROMPTS[1]])
    llm.shutdown()
    with LLM(path, **ARGS, speculative_config=spec(folder, 2, disable_by_batch_size=4)) as llm:
        eng, dec = llm.engine, llm.engine.executor.worker.runner.drafter
        before = dict(dec.seconds)
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)]
        assert got == expected
        assert eng.stats()["spec_decode"]["num_seqs_without_speculation"] == 8
        assert eng.spec_stats.num_draft_tokens == 0
        assert dec.seconds["mtp_catch_up"] == before["mtp_catch_up"]
        assert eng.blocks.num_free == ARGS["num_kv_blocks"]
        hits = eng.blocks.prefix_hit_tokens
        # PROMPTS[1] was computed above without the MTP layer: no hit for a speculating request
        out = llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=p)[0]
        assert out.outputs[0].token_ids == alone[0]
        assert out.metrics.spec.num_draft_tokens > 0 and eng.blocks.prefix_hit_tokens == hits
        assert eng.stats()["spec_decode"]["num_seqs_without_speculation"] == 8
        llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=p)  # its own blocks do hit
        assert eng.blocks.prefix_hit_tokens > hits
    with pytest.raises(ValueError, match="disable_by_batch_size"):
        SpeculativeConfig(disable_by_batch_size=-1)


def test_draft_path_is_16_bit_by_default_or_quantized(grafted):
    """With an fp32 model the reduced draft head and (CPU kernel) the MTP layer's products hold
    bf16 weights unless told otherwise (fp32, or int8 / int4 groups): the output is the same,
    and drafts only differ in near-ties."""
    from dist_engine.config import SpeculativeConfig
    from dist_engine.kernels.qlinear import QWeight

    path, folder, _ = grafted
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs, accepted = {}, {}
    for name, dtype in (("auto", torch.bfloat16), ("float32", torch.float32), ("int4", "int4")):
        cfg = spec(folder, 3, draft_vocab_size=200, draft_dtype=name)
        with LLM(path, **ARGS, speculative_config=cfg) as llm:
            dec = llm.engine.executor.worker.runner.drafter
            assert dec.draft_head.dtype == dtype
            packed = dec.mtp.layer.mlp.gate_up_proj.weight_packed
            assert packed.panels.dtype == dtype if name != "int4" else isinstance(packed, QWeight)
            outs[name] = [o.outputs[0].token_ids for o in llm.generate(
                prompt_token_ids=PROMPTS[:4], sampling_params=p)]
            accepted[name] = llm.engine.spec_stats.mean_accepted_length
    assert outs["auto"] == outs["float32"] == outs["int4"]
    assert accepted["float32"] > 1.2 and abs(accepted["auto"] - accepted["float32"]) < 0.1
    assert abs(accepted["int4"] - accepted["float32"]) < 0.15, accepted
    with pytest.raises(ValueError, match="draft_dtype"):
        SpeculativeConfig(draft_dtype="int2")


def test_draft_depth_in_engine_is_lossless(grafted):
    """An acceptance bar no position clears: the engine stops proposing (except every 8th
    step's probe) and output is still plain decoding's."""
    path, folder, _ = grafted
    params = mixed_params()
    expected, llm = run(path, params)
    llm.shutdown()
    forced, llm = run(path, params, speculative_config=spec(folder, 3, max_draft_tokens_per_step=0))
    forced_drafts = llm.engine.spec_stats.num_draft_tokens
    llm.shutdown()
    got, llm = run(path, params, speculative_config=spec(
        folder, 3, max_draft_tokens_per_step=0, min_draft_acceptance=0.99))
    with llm:
        assert got == expected == forced
        assert 0 < llm.engine.spec_stats.num_draft_tokens < forced_drafts / 2
        assert llm.engine.blocks.num_free == ARGS["num_kv_blocks"]


def test_large_batch_catch_up_shortcut_matches_general_path(grafted, monkeypatch):
    """While a large batch drafts nothing, the MTP layer catches up with the main pass's own
    metadata; drafting resumes as the batch shrinks, and every draft is what the general path
    (metadata rebuilt for the catch-up) proposes."""
    import dist_engine.worker.spec_decode as sd

    path, folder, _ = grafted
    prompts = PROMPTS + PROMPTS[:4]  # 12 sequences x K=2 > 8 drafts per step: K=0 at first
    params = [SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(12)]
    expected, llm = run(path, params, prompts=prompts)
    llm.shutdown()
    stats, taken = [], []
    same = sd._same_shape
    monkeypatch.setattr(sd, "_same_shape", lambda *a: taken.append(same(*a)) or taken[-1])
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(sd, "_same_shape", lambda *a: False)
        got, llm = run(path, params, prompts=prompts, speculative_config=spec(
            folder, 2, max_draft_tokens_per_step=8, disable_by_batch_size=0))
        with llm:
            assert got == expected
            stats.append(llm.engine.spec_stats.as_dict())
    assert sum(taken) >= 4  # the shortcut served the steps without drafts
    assert stats[0]["num_draft_tokens"] > 0 and stats[0] == stats[1]


def test_graft_prompts_and_held_out_split_are_unchanged(tmp_path, monkeypatch):
    """The prompts moved from Python literals to assets/graft/prompts.json: the list and its
    held-out split are exactly those the shipped graft was trained and measured on (digests
    recorded from the literals before the move), and an edited file is refused."""
    import hashlib

    from dist_engine.graft import prompts

    def digest(xs):
        return hashlib.sha256("\n".join(xs).encode()).hexdigest()

    train, held = prompts.split_prompts()
    assert (len(train), len(held)) == (2038, 226)
    assert digest(prompts.graft_prompts()) == "255ea0239c8512771f9bbf0e7dd30bf287ee27e8b4aa43e72e9546779ba63e48"
    assert digest(held) == "dbcce82122a3b70c0a026ac281173fad235b9aa15611390c9102d114238ba7b3"
    edited = tmp_path / "prompts.json"
    edited.write_bytes(open(prompts.PROMPTS_FILE, "rb").read().replace(b"photosynthesis", b"osmosis", 1))
    monkeypatch.setattr(prompts, "PROMPTS_FILE", str(edited))
    prompts.prompt_sets.cache_clear()
    with pytest.raises(ValueError, match="restore it"):
        prompts.graft_prompts()
    prompts.prompt_sets.cache_clear()
