"""Qwen3.5's caches through the engine: prefix caching on == off (prompts again, extending
earlier ones mid-block and on block boundaries, preemption forced); a prompt re-sent after an
MTP run that rejected drafts resumes from checkpoints that hold no draft's state; MTP at every
depth K = 1..4 for batches of 1 and 8 with prefix caching on; rejection sampling's
distribution; the start-up log's bytes per kind; TP=2 end to end."""

from __future__ import annotations

import logging

import pytest
import torch

from dist_engine import LLM, SamplingParams
from dist_engine.layers.state_cache import LayerState
from qwen3_5_harness import ENGINE, GREEDY, PROMPT, SEEDED, Harness, generate, load_ours

LOGPROBS = dict(max_tokens=24, ignore_eos=True, logprobs=0)


def _new(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _outputs(llm, prompts, params):
    """Token ids and the logprob of each sampled token, per prompt."""
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return ([o.outputs[0].token_ids for o in outs],
            [[d[t] for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs],
            [o.metrics.prefix_hit_tokens for o in outs])


def test_prefix_caching_on_equals_off_with_preemption(qwen3_5_models):
    """A 240-token prompt first (checkpoints at 64, 128, 192 in its prefill and 256 in its
    decode); then it again and extended at its end (a block boundary); then a batch too large
    for the 40 blocks (sequences are preempted and recompute): extending its first 200 tokens
    (mid-block: resumes at 192) and its first 160 (a block boundary between checkpoints: 128),
    extending it and 20 tokens of its output (256), an unrelated prompt. Greedy and seeded
    tokens equal an engine's without prefix caching, and so do their logprobs, bitwise, until
    preemption (a recomputed decode differs in the last bits from the single-token steps)."""
    base = PROMPT[:240]
    greedy, seeded = (SamplingParams(temperature=t, seed=7, **LOGPROBS) for t in (0.0, 0.8))
    runs, stats = {}, {}
    for caching in (False, True):
        with LLM(qwen3_5_models("qwen3_5"), speculative="none", enable_prefix_caching=caching,
                 **{**ENGINE, "kv_cache_memory": None, "num_kv_blocks": 40, "max_model_len": 320}) as llm:
            first = _outputs(llm, [base], [greedy])
            again = _outputs(llm, [base, base + _new(21, 1)], [seeded, greedy])
            eng = llm.engine
            assert eng.scheduler.num_preemptions == 0
            later = [base[:200] + _new(40, 2), base[:160] + _new(50, 3), base + first[0][0][:20], _new(230, 4)]
            runs[caching] = first, again, _outputs(llm, later, [greedy, seeded, greedy, seeded])
            assert eng.scheduler.num_preemptions > 0
            assert eng.blocks.num_free == 40 and eng.state.slots.num_free == eng.state.slots.num_slots
            stats[caching] = eng.state.checkpoints.hits
    (first, again, later), off = runs[True], runs[False]
    assert first[:2] == off[0][:2] and again[:2] == off[1][:2]  # tokens and logprobs, bitwise
    assert later[0] == off[2][0]
    for ours, want in zip(later[1], off[2][1]):
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    assert again[2] == [192, 192] and [h >= w for h, w in zip(later[2], [192, 128, 256])] == [True] * 3
    assert stats == {False: 0, True: stats[True]} and stats[True] >= 5


def test_prompt_resent_after_rejected_drafts_and_log_bytes(qwen3_5_models, caplog):
    """The random MTP layer's drafts are rejected, so every verification leaves rejected
    drafts' state behind in the step: the checkpoints saved meanwhile (256 in the decode of a
    240-token prompt) must hold the accepted tokens' state only. The prompt again, and
    extended by 20 of its output tokens (resuming at 256), give plain decoding's output. The
    start-up log's figures per kind (attention KV, the MTP layer's included; recurrent
    state) are the bytes allocated."""
    path = qwen3_5_models("qwen3_5")
    prompt = PROMPT[:240]
    with LLM(path, speculative="none", **ENGINE) as llm:
        plain = generate(llm, [prompt], GREEDY)[0]
        plain_ext = generate(llm, [prompt + plain[:20]], GREEDY)[0]
    with caplog.at_level(logging.INFO, logger="dist_engine"):
        with LLM(path, speculative="mtp", num_speculative_tokens=3, min_draft_acceptance=0.0, **ENGINE) as llm:
            assert generate(llm, [prompt], GREEDY) == [plain]
            stats = llm.engine.spec_stats
            assert stats.num_draft_tokens > 2 * stats.num_accepted_tokens
            outs = llm.generate(prompt_token_ids=[prompt, prompt + plain[:20]], sampling_params=GREEDY)
            assert [o.outputs[0].token_ids for o in outs] == [plain, plain_ext]
            assert [o.metrics.prefix_hit_tokens for o in outs] == [192, 256]
            info, runner = llm.engine.cache_info, llm.engine.executor.worker.runner
            caches = runner.kv_caches + [runner.drafter.kv]
    state = sum(t.nbytes for c in caches if isinstance(c, LayerState) for t in c.tensors.values())
    kv = sum(c.k.nbytes + c.v.nbytes for c in caches if not isinstance(c, LayerState))
    assert info["allocated_bytes"] == {"full": kv, "state": state}
    assert kv == info["bytes_per_block_by_group"]["full"] * info["num_blocks"]
    layout = runner.layout
    assert state == info["state_bytes_per_seq"] * (layout.num_state_slots + layout.num_checkpoints)
    assert f"{kv / 2**20:.1f} MiB" in caplog.text and f"{state / 2**20:.1f} MiB" in caplog.text
    assert f"{info['state_bytes_per_seq']} bytes/sequence" in caplog.text


@pytest.fixture(scope="module")
def eight(qwen3_5_models):
    """Eight prompts (lengths off and on the grid; some sharing prefixes), greedy and seeded
    in turn, and plain decoding's output for them."""
    prompts = [PROMPT[:150], _new(7, 5), _new(64, 6), PROMPT[:100] + _new(30, 7), _new(200, 8),
               PROMPT[:129], _new(1, 9), PROMPT[:64] + _new(90, 10)]
    params = [GREEDY, SEEDED] * 4
    with LLM(qwen3_5_models("qwen3_5"), speculative="none", **ENGINE) as llm:
        return prompts, params, generate(llm, prompts, params)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_mtp_every_depth_batch_1_and_8(qwen3_5_models, eight, monkeypatch, k):
    """K drafts per step for one sequence and for eight (no draft budget lowering K), prefix
    caching on (the batch of eight re-sends the first prompt: a checkpoint hit). The drafts
    are plain decoding's own tokens with every fifth one wrong, so steps accept every number
    of drafts from 0 to K (rejecting at every depth); the output equals plain decoding's,
    greedy and seeded."""
    from dist_engine.worker import spec_decode

    prompts, params, plain = eight
    targets: list[list[int]] = []  # by seq id: the prompt and plain decoding's tokens after it

    def oracle(self, g, seqs, specs, positions):
        return [(targets[s.seq_id][p] + (p % 5 == 0)) % 320 if p < len(targets[s.seq_id]) else 0
                for s, p in zip(seqs, positions)]

    monkeypatch.setattr(spec_decode.MTPDecoder, "_draft", oracle)
    spec = dict(method="mtp", num_speculative_tokens=k, max_draft_tokens_per_step=0,
                disable_by_batch_size=0, min_draft_acceptance=0.0)
    with LLM(qwen3_5_models("qwen3_5"), speculative_config=spec, **ENGINE) as llm:
        for batch in ([0], range(8)):
            targets.extend(prompts[i] + plain[i] for i in batch)
            assert generate(llm, [prompts[i] for i in batch], [params[i] for i in batch]) == [plain[i] for i in batch]
        stats = llm.engine.spec_stats
        assert all(stats.histogram[:k + 1]), stats.histogram
        assert llm.engine._spec_k(8) == (k, k) and llm.engine.state.checkpoints.hits > 0


def test_rejection_sampling_gives_the_target_distribution(qwen3_5_models):
    """Unseeded sampled requests verify the MTP layer's drafts by rejection sampling (drafts
    drawn from its distribution q, accepted with p / q, residual draws): the second token of
    600 completions of one prompt follows the plain model's marginal sum_t1 p(t1) p(t2 | t1),
    and fails a wrong temperature's (the negative control). At 0.3 the tiny model's marginal
    is far from uniform (about 30 cells expected 5 times or more). The plain model is ours,
    stepped by the harness without speculation (it equals transformers' to 1e-4 in
    test_qwen3_5.py; transformers' PyTorch fallback takes 20 s for these 320 prompts)."""
    from test_sampler import pooled_chi_square_p

    path = qwen3_5_models("qwen3_5")
    prompt, temp, n = PROMPT[:20], 0.3, 600
    V = 320
    h = Harness(load_ours(path), slots=V)
    logits, b = h.step([h.work(t, prompt + [t], 0) for t in range(V)])
    nxt = logits[b.sample_index]  # [V, V]: the logits after prompt + [t1]
    first = h.feed(prompt, [20], seq=0)[-1]  # [V]

    def marginal(t: float) -> torch.Tensor:  # [V]: P(token 2) at temperature t
        return torch.softmax(first / t, -1) @ torch.softmax(nxt / t, -1)

    spec = dict(method="mtp", num_speculative_tokens=2, max_draft_tokens_per_step=0,
                disable_by_batch_size=0, min_draft_acceptance=0.0)
    with LLM(path, speculative_config=spec, **{**ENGINE, "max_num_seqs": n}) as llm:
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            temperature=temp, n=n, max_tokens=3, ignore_eos=True))[0]
        assert llm.engine.spec_stats.num_accepted_tokens > 0
    counts = torch.bincount(torch.tensor([c.token_ids[1] for c in out.outputs]), minlength=V)
    for t, ok in ((temp, True), (temp * 1.5, False)):
        p = pooled_chi_square_p(counts, marginal(t))
        assert (p > 1e-3) if ok else (p < 1e-6), (t, p)


@pytest.mark.distributed
def test_tp2_engine_matches_transformers(qwen3_5_models, qwen3_5_generated, ray_session):
    """TP=2 end to end: each rank holds one key head's Gated DeltaNet state and half the
    attention heads; with MTP speculation and prefix caching on, 32 greedy tokens equal
    transformers', and the prompt re-sent (resuming from both ranks' checkpoints) gives them
    again."""
    want = qwen3_5_generated("qwen3_5")
    with LLM(qwen3_5_models("qwen3_5"), tensor_parallel_size=2, speculative="mtp",
             num_speculative_tokens=2, **ENGINE) as llm:
        assert generate(llm, [PROMPT[:150]], GREEDY) == [want]
        again = llm.generate(prompt_token_ids=[PROMPT[:150]], sampling_params=GREEDY)[0]
        assert again.outputs[0].token_ids == want and again.metrics.prefix_hit_tokens == 128
