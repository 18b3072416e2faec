"""Gemma 4 assistant drafters (speculative method ``gemma4_assistant``) on tiny random
checkpoints written here: the drafter's forward inside the engine (reading the target's paged
K/V, sliding blocks given back) against transformers' ``Gemma4AssistantForCausalLM`` fed the
target's own ``shared_kv_states``; speculative output identical to plain decoding for K = 1..4,
greedy and seeded; how the method is chosen and what is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gemma4_tiny import make, make_assistant

from dist_engine import LLM, SamplingParams
from dist_engine.config import EngineArgs, ModelConfig, SpeculativeConfig
from dist_engine.config.gemma4_assistant import Gemma4AssistantConfig, check_against
from dist_engine.worker.spec_assistant import AssistantDecoder

PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4]
PROMPTS = [PROMPT, [1, 5, 6], [1, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 88, 87], PROMPT[:13] + [8, 8]]
ENGINE = dict(block_size=4, num_kv_blocks=64, max_model_len=128, enable_prefix_caching=False,
              skip_tokenizer_init=True, dtype="float32")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4_assistant")
    cache: dict[str, tuple[str, str]] = {}

    def get(target: str) -> tuple[str, str]:
        if target not in cache:
            cache[target] = (make(target, str(root / target)),
                             make_assistant(target, str(root / f"{target}-assistant")))
        return cache[target]

    return get


def run(path: str, params, prompts=PROMPTS, **kw):
    """Outputs of ``prompts`` under ``params`` (a tuple: one batch per entry, one engine)."""
    with LLM(path, **ENGINE, **kw) as llm:
        got = [[o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=p)]
               for p in (params if isinstance(params, tuple) else (params,))]
        return (got if isinstance(params, tuple) else got[0]), llm.engine.spec_stats


@pytest.mark.parametrize("target", ["dense", "e"])
def test_drafter_forward_matches_transformers(pair, target, monkeypatch, oracle_drafts):
    """The drafts proposed right after the prompt: each round's input hidden state, logits and
    projected output equal transformers' assistant reading the K/V transformers' target stores
    for the assistant (the E model's are its last non-shared layers' of each type); the
    20-token prompt is longer than the sliding window (8), so the window's edge counts. Then
    the first round of every later proposal, over a context that holds accepted drafts (and
    sliding blocks given back: blocks of 4, window 8)."""
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    path, drafter = pair(target)
    rounds = []
    real = AssistantDecoder._forward

    def recording(self, work, meta, positions, hidden):
        r = real(self, work, meta, positions, hidden)
        rounds.append((work[0].token_ids[0], int(positions[0]), hidden[0].clone(), r.hidden[0].clone(),
                       r.logits[0].clone()))
        return r

    monkeypatch.setattr(AssistantDecoder, "_forward", recording)
    starts = []  # the first round of every proposal: (its index in rounds)
    real_start = AssistantDecoder._start

    def start(self, work, hidden):
        starts.append(len(rounds))
        return real_start(self, work, hidden)

    monkeypatch.setattr(AssistantDecoder, "_start", start)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    [out], _ = run(path, params, prompts=[PROMPT])
    text = PROMPT + list(out)
    # verification accepts some drafts (the drafter then reads their K/V) and rejects others
    oracle_drafts(AssistantDecoder, text)
    [got], stats = run(path, params, prompts=[PROMPT], speculative="gemma4_assistant",
                       speculative_model=drafter, num_speculative_tokens=3, min_draft_acceptance=0.0)
    assert list(got) == list(out) and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert len(rounds) >= 3 and len(starts) >= 3
    hf = Gemma4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    asst = Gemma4AssistantForCausalLM.from_pretrained(drafter, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor([PROMPT]), output_hidden_states=True, return_shared_kv_states=True,
                 use_cache=False)
        kv = out.shared_kv_states
        h = out.hidden_states[-1][:, -1:]  # final-norm state of the last prompt position
        P = len(PROMPT)
        assert rounds[0][0] == int(out.logits[0, -1].argmax()) == text[P]  # the first token
        for tok, pos, ours_in, ours_out, ours_logits in rounds[:3]:  # then the (oracle's) drafts
            assert pos == P  # the constant position: the first unverified one
            torch.testing.assert_close(ours_in, h[0, 0], rtol=1e-3, atol=1e-4)
            emb = hf.get_input_embeddings()(torch.tensor([[tok]]))
            o = asst(inputs_embeds=torch.cat([emb, h], dim=-1), position_ids=torch.tensor([[P]]),
                     shared_kv_states=kv, use_cache=False)
            torch.testing.assert_close(ours_logits, o.logits[0, -1].float(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours_out, o.last_hidden_state[0, -1], rtol=1e-3, atol=1e-4)
            h = o.last_hidden_state
        # every later proposal's first round, after verification steps that accepted drafts:
        # the context is every verified position before P
        for i in starts[1:]:
            tok, P, ours_in, ours_out, ours_logits = rounds[i]
            assert tok == text[P]
            out = hf(torch.tensor([text[:P]]), output_hidden_states=True, return_shared_kv_states=True,
                     use_cache=False)
            h = out.hidden_states[-1][:, -1:]
            torch.testing.assert_close(ours_in, h[0, 0], rtol=1e-3, atol=1e-4)
            emb = hf.get_input_embeddings()(torch.tensor([[tok]]))
            o = asst(inputs_embeds=torch.cat([emb, h], dim=-1), position_ids=torch.tensor([[P]]),
                     shared_kv_states=out.shared_kv_states, use_cache=False)
            torch.testing.assert_close(ours_logits, o.logits[0, -1].float(), rtol=1e-4, atol=1e-4)


def test_speculative_output_equals_plain(pair):
    """K = 1..4 with the drafter: greedy and seeded outputs of a batch of four identical to
    plain decoding, drafts proposed and verified every step."""
    path, drafter = pair("dense")
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    seeded = [dataclasses.replace(greedy, temperature=0.8, seed=11 + i) for i in range(len(PROMPTS))]
    plain, _ = run(path, (greedy, seeded))
    for k in range(1, 5):
        got, stats = run(path, (greedy, seeded), speculative="gemma4_assistant" if k % 2 else "auto",
                         speculative_model=drafter, num_speculative_tokens=k, min_draft_acceptance=0.0)
        assert got == plain, k  # (auto: the folder names its method)
        assert stats.num_draft_tokens > 0


def test_method_choice_and_refusals(pair, tmp_path):
    path, drafter = pair("dense")
    mcfg = ModelConfig.from_pretrained(path)
    args = EngineArgs(model=path, speculative_model=drafter)
    assert args.speculative_for(path, mcfg).method == "gemma4_assistant"  # from its config.json
    spec = EngineArgs(model=path, speculative="gemma4_assistant", speculative_model=drafter,
                      num_speculative_tokens=3).speculative_for(path, mcfg)
    assert (spec.num_lookahead_slots, spec.window_lookback) == (3, 1)  # it writes no cache
    assert SpeculativeConfig(method="deepseek_mtp").method == "mtp"  # vLLM's name for it
    with pytest.raises(ValueError, match="needs its drafter checkpoint"):
        EngineArgs(model=path, speculative="gemma4_assistant").speculative_for(path, mcfg)
    with pytest.raises(ValueError, match="not supported"):
        EngineArgs(model=path, speculative_config={"method": "medusa"}).speculative_for(path, mcfg)
    acfg = Gemma4AssistantConfig.from_pretrained(drafter)
    assert check_against(acfg, mcfg) == {"sliding_attention": 3, "full_attention": 4}
    with pytest.raises(ValueError, match="hidden size 128; this model's is 64"):
        check_against(dataclasses.replace(acfg, backbone_hidden_size=128), mcfg)
    with pytest.raises(ValueError, match="not a Gemma 4 assistant"):
        Gemma4AssistantConfig.from_pretrained(path)


@pytest.mark.distributed
def test_tp2_drafts_as_tp1(pair, tmp_path, ray_session):
    """TP=2 (the dense target's sliding KV heads split 1 + 1, its global KV head replicated):
    the assistant's heads split as the target's KV heads are, the DFlash drafter runs whole on
    each rank; output = plain and every draft accepted as often as at TP=1 (the same drafts)."""
    from test_dflash import make_drafter

    path, assistant = pair("dense")
    dflash = make_drafter(str(tmp_path / "dflash"))
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = run(path, greedy)[0]
    for folder, k in ((assistant, 2), (dflash, 3)):
        spec = dict(speculative_model=folder, num_speculative_tokens=k, min_draft_acceptance=0.0)
        _, one = run(path, greedy, **spec)
        got, two = run(path, greedy, tensor_parallel_size=2, **spec)
        assert got == plain
        assert (two.num_draft_tokens, two.num_accepted_tokens) == (one.num_draft_tokens, one.num_accepted_tokens)
