"""Routed experts paged under a budget (``expert_cache_memory``): the same tokens and logprobs as
all-resident experts and transformers with a few experts per layer resident (eviction, waves,
prefetch, both policies), batching, speculative verification, TP=2, FP8 experts, fused 3-D
expert tensors, the budget's minimum, the stats surfaces, and the process's memory."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from conftest import hf_model, make_tiny
from dist_engine import LLM, SamplingParams

r = random.Random(5)
PROMPTS = [[1] + [r.randrange(3, 320) for _ in range(60)], [1] + [r.randrange(3, 320) for _ in range(9)]]
ARGS = dict(skip_tokenizer_init=True, max_model_len=256, block_size=4, max_num_batched_tokens=32,
            num_kv_blocks=96)
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
# two MoE layers of 8 experts each (Qwen3-MoE: every layer sparse; DeepSeek-V3: a dense first layer)
DEEP = {"qwen3_moe": dict(decoder_sparse_step=1), "deepseek_v3": dict(num_hidden_layers=3)}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("paged")
    return {name: make_tiny(name, str(root / name), **over) for name, over in DEEP.items()}


def minimum_budget(path: str, **kw) -> int:
    """The smallest budget the engine accepts, read from the error a too-small one gets."""
    with pytest.raises(ValueError, match=r"expert_cache_memory=.* is below the minimum") as e:
        LLM(path, expert_cache_memory=1024, **ARGS, **kw)
    return int(re.search(r"at least (\d+) bytes", str(e.value)).group(1))


def run(path: str, prompts=PROMPTS, params=GREEDY, **kw):
    with LLM(path, **ARGS, **kw) as llm:
        outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
        return outs, llm.engine.stats()


def hf_tokens(path: str, prompts: list[list[int]], n: int = 20) -> list[list[int]]:
    model = hf_model(path)
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("arch", sorted(DEEP))
def test_paged_experts_give_resident_and_transformers_tokens(moe_models, arch):
    """Two of sixteen experts' slots (one token's top-k: every step streams in waves) and five
    (prefetch on): the resident run's tokens and bitwise logprobs, and transformers' tokens,
    batched and alone."""
    path = moe_models[arch]
    resident, _ = run(path)
    assert [o.token_ids for o in resident] == hf_tokens(path, PROMPTS)
    base = minimum_budget(path)
    per_expert = 24 * 1024  # gate/up [64, 64] and down [64, 32] fp32 panels
    for extra, policy, prefetch in ((0, "lru", False), (3, "lfu", True)):
        budget = base + extra * per_expert
        with LLM(path, expert_cache_memory=budget, expert_cache_policy=policy, expert_prefetch=prefetch,
                 **ARGS) as llm:
            outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
            s = llm.engine.stats()["expert_cache"]
            # alone, with the cache as the batch left it: rows of a step share loaded experts
            alone = llm.generate(prompt_token_ids=PROMPTS[1:], sampling_params=GREEDY)[0].outputs[0]
        assert [o.token_ids for o in outs] == [o.token_ids for o in resident], (extra, policy, prefetch)
        assert [o.logprobs for o in outs] == [o.logprobs for o in resident]
        assert alone.token_ids == resident[1].token_ids
        assert s["num_slots"] == 2 + extra and s["num_experts"] == 16
        assert s["resident_bytes"] <= s["num_slots"] * s["expert_bytes"] <= budget
        assert (s["hits"] > 0 or not extra) and s["misses"] > 0 and s["evictions"] > 0
        assert (s["prefetches"] > 0) == prefetch
        assert s["bytes_read"] == (s["misses"] + s["prefetches"]) * per_expert
        assert s["hit_rate"] < 1 and s["bytes_per_token"] == pytest.approx(s["bytes_read"] / s["tokens"], abs=0.1)


def test_budget_errors_are_actionable(moe_models, tiny_models):
    path = moe_models["qwen3_moe"]
    need = minimum_budget(path)
    assert need == 2 * 24 * 1024 + 2 * 24 * 1024  # top-2 experts + the staging copy and read buffer
    # sized from memory_fraction: start-up profiles a prefill chunk, which must read no expert
    sized = {k: v for k, v in ARGS.items() if k != "num_kv_blocks"}
    with LLM(path, expert_cache_memory=need, **sized) as llm:
        assert llm.engine.stats()["expert_cache"]["num_slots"] == 2
        assert llm.engine.executor.worker.runner.expert_cache.seq == 0  # no load submitted yet
        out = llm.generate(prompt_token_ids=PROMPTS[1:], sampling_params=GREEDY)[0].outputs[0]
        assert len(out.token_ids) == 20 and llm.engine.stats()["expert_cache"]["misses"] > 0
    with pytest.raises(ValueError, match="has no routed experts"):
        LLM(tiny_models("llama"), expert_cache_memory="1MiB", **ARGS)
    with pytest.raises(ValueError, match="expert_cache_memory: 'lots' is not a size"):
        LLM(path, expert_cache_memory="lots", **ARGS)
    with pytest.raises(ValueError, match="expert_cache_policy must be one of"):
        LLM(path, expert_cache_memory="1MiB", expert_cache_policy="fifo", **ARGS)


def test_cli_flags_reach_the_engine_config(moe_models):
    from dist_engine.cli import build_parser, engine_args
    from dist_engine.config import ExpertCacheConfig

    path = moe_models["qwen3_moe"]
    a = engine_args(build_parser().parse_args(["serve", "--model", path, "--expert-cache-memory", "1GiB",
                                               "--no-expert-prefetch", "--expert-cache-policy", "lru"]))
    assert a.engine_config(path).experts == ExpertCacheConfig(memory=2**30, policy="lru", prefetch=False)
    assert engine_args(build_parser().parse_args(["serve", "--model", path])).engine_config(path).experts is None


def test_speculative_verification_shares_paged_experts(with_mtp_layer):
    """DeepSeek-V3 with its native MTP layer (an MoE block) drafting K=2: the MTP layer's
    experts are paged too, and greedy and seeded output equal plain resident decoding."""
    p = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
         SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)]
    plain, _ = run(with_mtp_layer, params=p, speculative="none")
    spec = {"method": "mtp", "num_speculative_tokens": 2, "max_draft_tokens_per_step": 0}
    with LLM(with_mtp_layer, expert_cache_memory=minimum_budget(with_mtp_layer, speculative="none") + 49152,
             speculative_config=spec, **ARGS) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=p)]
        cache = llm.engine.executor.worker.runner.expert_cache
        assert {prefix for prefix, _ in cache.index.refs} == {"model.layers.1.mlp.experts.",
                                                              "model.layers.2.mlp.experts."}
        assert llm.engine.spec_stats.num_accepted_tokens > 0
        assert llm.engine.stats()["expert_cache"]["evictions"] > 0
    assert got == [o.token_ids for o in plain]


@pytest.mark.distributed
def test_tp2_each_rank_pages_its_own_experts(moe_models, ray_session):
    import ray

    path = moe_models["deepseek_v3"]
    resident, _ = run(path)
    with LLM(path, tensor_parallel_size=2, expert_cache_memory=4 * 24 * 1024 + 49152, **ARGS) as llm:
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == [o.token_ids for o in resident]
        for a, b in zip(outs, resident):
            for x, y in zip(a.outputs[0].logprobs, b.logprobs):
                assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)
        experts = ray.get([w.__ray_call__.remote(
            lambda self: sorted({e for _, e in self.runner.expert_cache.index.refs}))
            for w in llm.engine.executor.workers])
        s = llm.engine.stats()["expert_cache"]
    assert experts == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert s["num_experts"] == 16 and s["num_slots"] == 4 and s["evictions"] > 0


def test_fp8_experts_page_in_their_own_format(tiny_models, tmp_path):
    """FP8 block-scaled experts (weight + weight_scale_inv) are paged as FP8 and give the
    resident FP8 model's tokens and logprobs."""
    from test_deepseek_v3 import _fp8_pair

    fp8, f32 = str(tmp_path / "fp8"), str(tmp_path / "f32")
    _fp8_pair(tiny_models("deepseek_v3"), fp8, f32, (32, 32))
    resident, _ = run(fp8)
    with LLM(fp8, expert_cache_memory=minimum_budget(fp8) + 8192, **ARGS) as llm:  # 3 slots of 8
        outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        slot = llm.engine.executor.worker.runner.expert_cache.slots[0].module
        assert slot.gate_up_proj.weight.dtype == torch.float8_e4m3fn
        assert llm.engine.stats()["expert_cache"]["evictions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in resident]
    assert [o.logprobs for o in outs] == [o.logprobs for o in resident]


def _fuse(src: str, out: str) -> None:
    """``src`` rewritten with each layer's experts as fused 3-D tensors (transformers 5's and
    Qwen3.5-MoE's layout): ``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(f"{src}/model.safetensors")
    fused = {}
    for name in list(tensors):
        m = re.match(r"(.*\.mlp\.experts\.)(\d+)\.(\w+)\.weight$", name)
        if m:
            fused.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = tensors.pop(name)
    for prefix, parts in fused.items():
        n = len(parts["down_proj"])
        tensors[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(n)])
        tensors[prefix + "down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    os.remove(f"{out}/model.safetensors")
    save_file(tensors, f"{out}/model.safetensors")


def test_fused_expert_tensors_are_read_one_expert_at_a_time(moe_models, tmp_path):
    from dist_engine.experts.source import ExpertIndex, FileReader

    src, fused = moe_models["qwen3_moe"], str(tmp_path / "fused")
    _fuse(src, fused)
    index = ExpertIndex(fused, {"model.layers.1.mlp.experts.": (2, 3)})
    refs = index.refs["model.layers.1.mlp.experts.", 3]
    assert sorted(refs) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    assert refs["gate_proj.weight"].nbytes == 32 * 64 * 4  # one expert's half, not the [8, 64, 64] tensor
    from safetensors import safe_open

    with safe_open(f"{src}/model.safetensors", "pt") as f:
        got = FileReader(index.expert_nbytes(), pin=False).read(refs)
        for suffix, t in got.items():
            assert torch.equal(t, f.get_tensor(f"model.layers.1.mlp.experts.3.{suffix}"))
    expected, _ = run(src, expert_cache_memory="150KiB")
    outs, _ = run(fused, expert_cache_memory="150KiB")
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]


def test_stats_reach_grpc_and_prometheus(moe_models):
    from prometheus_client import generate_latest

    from dist_engine.server.metrics import ServerMetrics
    from dist_engine.server.servicer import expert_stats

    _, stats = run(moe_models["qwen3_moe"], expert_cache_memory="150KiB")
    msg = expert_stats(stats["expert_cache"])
    assert msg.hits == stats["expert_cache"]["hits"] and msg.hit_rate == stats["expert_cache"]["hit_rate"]
    text = generate_latest(ServerMetrics(lambda: stats).registry).decode()
    assert f"dist_engine:expert_cache_misses_total {float(stats['expert_cache']['misses'])}" in text
    for name in ("expert_cache_hit_rate", "expert_cache_bytes_paged_per_token", "expert_cache_resident_bytes"):
        assert f"dist_engine:{name} " in text


def _memory_model(path: str) -> str:
    """A Qwen3-MoE whose routed experts dominate memory: 6 layers x 16 experts of 1.5 MiB
    (fp32, hidden 256, moe_intermediate 512) = 144 MiB of experts."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=512,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    file = f"{path}/model.safetensors"
    fd = os.open(file, os.O_RDONLY)
    os.fsync(fd)  # clean pages, so the kernel can drop them, then start with none cached
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return path


def _probe(path: str, *args: str) -> dict:
    probe = os.path.join(os.path.dirname(__file__), "expert_memory_probe.py")
    out = subprocess.run([sys.executable, probe, path, *args], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_resident_memory_stays_under_the_budget(tmp_path):
    """RssAnon sampled while generating, in a subprocess: with a 24 MiB budget for 144 MiB of
    experts the worker's heap peaks at least 0.8 x 120 MiB below the all-resident run's; the
    experts it read are not left in RssFile or in the page cache."""
    path = _memory_model(str(tmp_path / "moe"))
    paged = _probe(path, "--budget", "24MiB")
    resident = _probe(path)
    mib = 2**20
    print(f"\npeak RssAnon while generating: paged {paged['peak_rss_anon'] / mib:.0f} MiB, all resident "
          f"{resident['peak_rss_anon'] / mib:.0f} MiB; peak RssFile paged {paged['peak_rss_file'] / mib:.0f} "
          f"MiB; experts page-cached after the run: paged {paged['expert_bytes_page_cached'] / mib:.1f} "
          f"MiB, resident {resident['expert_bytes_page_cached'] / mib:.1f} MiB of "
          f"{paged['expert_bytes_on_disk'] / mib:.0f} MiB")
    assert paged["tokens"] == resident["tokens"]
    s = paged["expert_cache"]
    experts = s["num_experts"] * s["expert_bytes"]
    assert experts == 144 * mib and s["misses"] > 0 and s["evictions"] > 0
    assert s["num_slots"] * s["expert_bytes"] <= 24 * mib
    assert resident["peak_rss_anon"] - paged["peak_rss_anon"] > 0.8 * (experts - 24 * mib)
    assert paged["peak_checkpoint_mapped"] == 0  # experts are read, not memory-mapped
    assert paged["expert_bytes_page_cached"] < 0.05 * paged["expert_bytes_on_disk"]
    assert resident["expert_bytes_page_cached"] > 0.9 * resident["expert_bytes_on_disk"]
