"""Gemma 4 against transformers on tiny random dense, MoE and E-model checkpoints (every
parameter random, constant-initialised ones included): logits, greedy tokens, the sliding
layers' blocks given back, prefix caching, KV sharing, batching, TP=2, both config spellings
and the conditional-generation checkpoint's text part."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from gemma4_tiny import make, released_spelling
from test_context_parallel import split_steps

from conftest import hf_greedy, hf_model
from dist_engine import LLM, SamplingParams
from dist_engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from dist_engine.distributed.comm import NullCommunicator
from dist_engine.kv_cache.kinds import CacheLayout, SharedKV, group_window, paged_groups
from dist_engine.models import model_class
from dist_engine.weights.loader import load_weights
from dist_engine.worker.batch import build_batch
from dist_engine.worker.caches import allocate, layer_kinds
from dist_engine.worker.messages import SeqWork
from dist_engine.worker.model_runner import group_heads

PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4]
OTHERS = [[1, 5, 6], [1, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 88, 87], PROMPT[:13] + [8, 8]]
NAMES = ["dense", "moe", "e"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4")
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            base, _, variant = name.partition("-")
            cache[name] = make(base, str(root / name), multimodal=variant == "mm")
        return cache[name]

    return get


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def our_logits(path: str, tokens: list[int], chunks: list[int], paged: bool) -> torch.Tensor:
    """Logits of every position, fed in ``chunks`` through paged caches built from the layers'
    kinds (``paged``: chunks of up to 16 tokens through the C kernel over block tables)."""
    cfg = ModelConfig.from_pretrained(path)
    model = model_class(cfg.architecture)(cfg, NullCommunicator(), torch.float32, 512)
    load_weights(model, path)
    layers = list(model.model.layers)
    per_layer = [layer_kinds(layer, torch.float32, None) for layer in layers]
    kinds = [k for ks in per_layer for k in ks]
    groups = tuple(paged_groups(kinds))
    caches = allocate(kinds, CacheLayout(tuple((g, 32) for g in groups)), 4, torch.device("cpu"), 4)
    (heads, fold), *others = group_heads(layers, per_layer, groups, 1)
    table = tuple(reversed(range(1, 32)))  # non-trivial block ids, the same in every group
    out, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            work = SeqWork(0, tuple(tokens[start:start + n]), start, table, True,
                           group_tables=(table,) * (len(groups) - 1))
            b = build_batch((work,), 4, [group_window(g) for g in groups], heads, torch.float32,
                            torch.device("cpu"), fold=fold, paged=paged, groups=groups,
                            group_heads=tuple(others))
            out.append(model.compute_logits(model(b.ids, b.positions, caches, b.meta)))
            start += n
    return torch.cat(out)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(gemma, name):
    """Prefill chunks longer than the sliding window (8) and decode-sized steps through the C
    kernel: every position's logits equal transformers' (soft-capped at 2: tanh bends them)."""
    path = gemma(name)
    with torch.inference_mode():
        ref = hf_model(path)(torch.tensor([PROMPT])).logits[0].float()
    assert 1.2 < ref.abs().max() < 2  # raw logits reach ~2.5; the cap bends them
    for chunks, paged in (([12, 8], False), ([9, 1, 1, 5, 4], True)):
        torch.testing.assert_close(our_logits(path, PROMPT, chunks, paged), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers_with_sliding_blocks_given_back(gemma, name):
    """32 greedy tokens equal transformers', alone and batched with other prompts, while the
    sliding layers hold only their window's blocks (8 tokens: 2-4 blocks of 4) and the global
    layers every block; nothing leaks."""
    path = gemma(name)
    prompts = [PROMPT] + OTHERS
    lens = [32] + [12] * len(OTHERS)
    expected = [hf_greedy(path, p, n) for p, n in zip(prompts, lens)]
    with LLM(path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=48, block_size=4,
             max_num_batched_tokens=16) as llm:
        eng = llm.engine
        window = eng.others.managers["window8"]
        eng.add_request("solo", PROMPT, greedy(32))
        held = []
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    assert out.outputs[0].token_ids == expected[0]
            held.append((eng.blocks.num_blocks - eng.blocks.num_free, window.num_blocks - window.num_free))
        assert max(full for full, _ in held) == (len(PROMPT) + 31 + 3) // 4  # every position
        assert max(win for _, win in held) <= 6  # window + a 16-token chunk, not 13
        # E model: prefill chunks ran the KV-shared layers (4 and 5) on the sampled row only
        assert eng.executor.worker.runner.num_tail_steps == (2 if name == "e" else 0)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=[greedy(n) for n in lens])
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert eng.blocks.num_free == 48 and window.num_free == 48


def test_prefix_cache_on_equals_off(gemma):
    """A second prompt sharing 32 tokens with a first (window 8): the hit must find the
    sliding layers' window blocks before it (given back by the first, still cached) and the
    KV-shared layers read their sources' blocks; tokens equal caching off and transformers."""
    path = gemma("e")
    first = PROMPT + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
    second = first[:32] + [300, 301, 302, 303, 304]
    expected = hf_greedy(path, second, 16)
    for caching in (True, False):
        with LLM(path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=40, block_size=4,
                 max_num_batched_tokens=16, enable_prefix_caching=caching) as llm:
            llm.generate(prompt_token_ids=[first], sampling_params=greedy(8))
            out = llm.generate(prompt_token_ids=[second], sampling_params=greedy(16))[0]
            assert out.outputs[0].token_ids == expected
            assert out.metrics.prefix_hit_tokens == (32 if caching else 0)
            assert llm.engine.blocks.num_free == 40


@pytest.mark.parametrize("name", ["dense", "e"])
def test_static_decode_path_matches(gemma, monkeypatch, name):
    """The decode path CUDA graphs record (one block table and write slot per paged group, run
    eagerly here) gives the normal path's tokens and logprobs, sliding window and KV sharing
    included."""
    from dist_engine.worker import cuda_graph

    path = gemma(name)
    prompts = [PROMPT, OTHERS[0], PROMPT + PROMPT[1:]]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.9, seed=5, max_tokens=12, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)]
    runs = []
    for static in (False, True):
        monkeypatch.setattr(cuda_graph, "STATIC_DECODE_ON_CPU", static)
        with LLM(path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=48, block_size=4) as llm:
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
            graphs = llm.engine.executor.worker.runner.graphs
            runs.append(([o.outputs[0] for o in outs], graphs.num_steps if graphs else 0))
    (plain, none), (static_outs, steps) = runs
    assert none == 0 and steps >= 10
    for a, b in zip(plain, static_outs):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)


def test_kv_shared_layers_allocate_nothing(gemma, caplog):
    """The E model's last two layers read layers 3 and 2's caches (the very tensors); the
    start-up log's bytes per group are the allocated ones, shared layers adding none."""
    path = gemma("e")
    with caplog.at_level(logging.INFO, logger="dist_engine.engine.llm_engine"):
        llm = LLM(path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=16, block_size=4)
    with llm:
        runner = llm.engine.executor.worker.runner
        assert runner.kinds[4] == SharedKV(3, "window8") and runner.kinds[5] == SharedKV(2, "full")
        assert runner.kv_caches[4] is runner.kv_caches[3] and runner.kv_caches[5] is runner.kv_caches[2]
        # 1 KV head: sliding layers 0, 1, 3 of dim 16, global layer 2 of dim 32; K and V, fp32
        assert runner.bytes_per_block() == {"full": 2 * 32 * 4 * 4, "window8": 3 * 2 * 16 * 4 * 4}
        assert runner.allocated_bytes() == {"full": 16 * 2 * 32 * 4 * 4, "window8": 16 * 3 * 2 * 16 * 4 * 4}
    lines = [r.getMessage() for r in caplog.records if "bytes/token" in r.getMessage()]
    assert any("full attention" in m and "256 bytes/token" in m for m in lines)
    assert any("window8 attention" in m and "384 bytes/token" in m for m in lines)


def test_config_spellings_and_errors(gemma, tmp_path):
    """transformers 5.25 writes per_layer_config; released configs global_head_dim and
    num_global_key_value_heads: both read alike. Impossible splits and configs are ValueErrors
    that name what to change."""
    path = gemma("dense")
    ours = ModelConfig.from_pretrained(path)
    assert ours.layer_head_dims == (16, 16, 32, 16, 32) and ours.layer_kv_heads == (2, 2, 1, 2, 1)
    other = str(tmp_path / "released")
    os.makedirs(other)
    for f in os.listdir(path):
        os.symlink(os.path.join(path, f), os.path.join(other, f))
    os.remove(os.path.join(other, "config.json"))
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(raw, f)
    released_spelling(other)
    theirs = ModelConfig.from_pretrained(other)
    assert (theirs.layer_head_dims, theirs.layer_kv_heads) == (ours.layer_head_dims, ours.layer_kv_heads)
    with pytest.raises(ValueError, match="2 KV heads of the sliding_attention layers"):
        EngineConfig(model=ours, parallel=ParallelConfig(tensor_parallel_size=3), cache=CacheConfig())
    with pytest.raises(ValueError, match="one KV-head count"):
        EngineConfig(model=ours, parallel=ParallelConfig(tensor_parallel_size=2, decode_context_parallel_size=2))
    bad = dict(raw, per_layer_config={"2": {"intermediate_size": 8}})
    with pytest.raises(ValueError, match="only head_dim, num_key_value_heads"):
        ModelConfig.from_dict(bad)
    with pytest.raises(ValueError, match="encoder"):
        ModelConfig.from_dict(dict(raw, use_bidirectional_attention="all"))
    with pytest.raises(ValueError, match="num_kv_shared_layers"):
        ModelConfig.from_dict(dict(raw, num_kv_shared_layers=5))


def test_conditional_generation_checkpoint_serves_its_text_model(gemma, caplog):
    """Gemma4ForConditionalGeneration: the text weights under model.language_model.* load, the
    vision tower is skipped with one log line, and the tokens are transformers' (whose class
    for this config is the conditional-generation one)."""
    path = gemma("moe-mm")
    expected = hf_greedy(path, PROMPT, 16)
    with caplog.at_level(logging.INFO, logger="dist_engine.models.gemma4"):
        with LLM(path, skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=32, block_size=4) as llm:
            assert llm.generate(prompt_token_ids=[PROMPT], sampling_params=greedy(16))[0].outputs[0].token_ids == expected
    assert sum("vision tower" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.distributed
def test_tp2_matches_transformers(gemma, ray_session):
    """TP=2 on the MoE model: sliding layers split their 2 KV heads 1 + 1, global layers
    replicate their one KV head and split its 4 query heads, experts split 4 + 4."""
    path = gemma("moe")
    expected = hf_greedy(path, PROMPT, 32)
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([PROMPT])).logits[0, -1].float(), -1)
    with LLM(path, tensor_parallel_size=2, skip_tokenizer_init=True, max_model_len=128,
             num_kv_blocks=48, block_size=4) as llm:
        out = llm.generate(prompt_token_ids=[PROMPT, OTHERS[1]], sampling_params=[
            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5), greedy(8)])
        assert out[0].outputs[0].token_ids == expected
        for tok, lp in out[0].outputs[0].logprobs[0].items():
            assert abs(lp - ref[tok].item()) < 1e-4
        assert out[1].outputs[0].token_ids == hf_greedy(path, OTHERS[1], 8)


@pytest.mark.distributed
def test_cp2_matches_transformers(gemma, ray_session):
    """CP=2 on the E model: a 60-token prompt's prefill split over the two sequence shards in
    both paged groups (each stripes block i onto shard i mod 2), shared layers reading their
    sources' shards."""
    path = gemma("e")
    long = PROMPT * 3
    with LLM(path, context_parallel_size=2, skip_tokenizer_init=True, max_model_len=128,
             num_kv_blocks=48, block_size=4, max_num_batched_tokens=40) as llm:
        out = llm.generate(prompt_token_ids=[long], sampling_params=greedy(12))[0]
        assert out.outputs[0].token_ids == hf_greedy(path, long, 12)
        assert min(split_steps(llm)) > 0  # the prefill chunks were split
        assert llm.engine.blocks.num_free == 48 * 2 and llm.engine.others.managers["window8"].num_free == 48 * 2
