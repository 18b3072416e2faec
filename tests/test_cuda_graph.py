"""The decode path CUDA graphs record (worker/cuda_graph.py): static shapes, padded batches,
key slots through block tables on the device. Run eagerly on CPU here, it must give what the
normal path gives; bench/gpu_check.py checks the recorded graphs on a GPU."""

from __future__ import annotations

import random

import pytest
import torch

from dist_engine import LLM, SamplingParams
from dist_engine.worker import cuda_graph

ARGS = dict(skip_tokenizer_init=True, max_model_len=512, num_kv_blocks=160, block_size=8)


def run(path: str, prompts, params, static: bool, monkeypatch):
    monkeypatch.setattr(cuda_graph, "STATIC_DECODE_ON_CPU", static)
    with LLM(path, **ARGS) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        graphs = llm.engine.executor.worker.runner.graphs
        steps = graphs.num_steps if graphs is not None else 0
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], steps


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "llama3rope"])
def test_static_decode_matches_normal_path(tiny_models, monkeypatch, arch):
    """5 sequences (padded to 8) of mixed lengths, some past MIN_KEYS keys (a larger key
    bucket), greedy and seeded sampling, sliding window (mistral), q/k norms (qwen3)."""
    path = tiny_models(arch)
    r = random.Random(3)
    prompts = [[1] + [r.randrange(3, 320) for _ in range(n)] for n in (3, 40, 250, 7, 120)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3) if i % 2 == 0 else
              SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=16 + i, ignore_eos=True, logprobs=3)
              for i in range(len(prompts))]
    expected, none = run(path, prompts, params, False, monkeypatch)
    got, steps = run(path, prompts, params, True, monkeypatch)
    assert none == 0 and steps >= 20  # every decode step took the static path
    for (t_exp, lp_exp), (t_got, lp_got) in zip(expected, got):
        assert t_got == t_exp
        for a, b in zip(lp_exp, lp_got):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    # batch 1 (no padding)
    alone, _ = run(path, prompts[2:3], params[2:3], True, monkeypatch)
    assert alone[0][0] == expected[2][0]


def test_large_steps_and_failed_capture_run_eagerly(tiny_models, monkeypatch):
    """A step whose K/V gather would exceed MAX_GATHER_ELEMENTS runs eagerly; a capture that
    fails (out of memory, say) leaves that step and every later one eager, output unchanged."""
    path = tiny_models("llama")
    prompts = [[1, 5, 9, 33], [1, 7]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected, _ = run(path, prompts, params, False, monkeypatch)
    monkeypatch.setattr(cuda_graph, "MAX_GATHER_ELEMENTS", 10)
    got, steps = run(path, prompts, params, True, monkeypatch)
    assert got == expected and steps == 0
    monkeypatch.setattr(cuda_graph, "MAX_GATHER_ELEMENTS", 1 << 26)

    def fail(self, kind, Bp, Kp):
        raise torch.OutOfMemoryError("no memory for the graph")

    monkeypatch.setattr(cuda_graph.DecodeGraphs, "_record", fail)
    with LLM(path, **ARGS) as llm:
        graphs = llm.engine.executor.worker.runner.graphs
        graphs.capture = True  # as on a GPU: the first decode step records, and fails
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        assert [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs] == expected
        assert graphs.failed and graphs.num_steps == 1


def test_not_used_where_it_does_not_apply(tiny_models, monkeypatch):
    """MoE routing and MLA stay eager; so does a step with hidden states asked for."""
    monkeypatch.setattr(cuda_graph, "STATIC_DECODE_ON_CPU", True)
    for arch in ("qwen3_moe", "deepseek_v3"):
        with LLM(tiny_models(arch), **ARGS) as llm:
            assert llm.engine.executor.worker.runner.graphs is None
    with LLM(tiny_models("llama"), **ARGS) as llm:
        llm.generate(prompt_token_ids=[[1, 5, 9]], sampling_params=SamplingParams(
            max_tokens=6, ignore_eos=True, return_hidden_states=True))
        assert llm.engine.executor.worker.runner.graphs.num_steps == 0



def test_cli_auto_speculation_off_where_decode_is_graphed(tiny_models, grafted, tmp_path):
    """On CUDA with graphs, `--speculative auto` leaves a model's MTP layer unused (graphed
    speculative steps are not yet measured against graphed plain decode on a GPU); eager, TP=2,
    explicit, or on CPU it is used. The CLI and the Python API resolve it the same way."""
    import json
    import shutil

    from dist_engine.cli import build_parser, engine_args
    from dist_engine.config import EngineArgs, ModelConfig

    def speculative_arg(a):
        args = engine_args(a)
        assert args == EngineArgs(**{k: getattr(args, k) for k in ("model", "device", "enforce_eager",
                                                                   "speculative", "tensor_parallel_size",
                                                                   "speculative_model")})
        return args.speculative_for(args.model, ModelConfig.from_pretrained(args.model))

    native = tmp_path / "native"  # a checkpoint announcing an MTP layer (only its config is read)
    shutil.copytree(tiny_models("llama"), native)
    cfg = json.load(open(native / "config.json"))
    json.dump({**cfg, "num_nextn_predict_layers": 1}, open(native / "config.json", "w"))
    base = ["generate", "x", "--model", str(native)]
    parse = build_parser().parse_args
    assert speculative_arg(parse(base)) is None  # announced in config.json, but no weights ship
    from safetensors.torch import save_file

    save_file({"model.layers.2.enorm.weight": torch.ones(4)}, str(native / "mtp.safetensors"))
    assert speculative_arg(parse(base)) is not None  # CPU
    assert speculative_arg(parse(base + ["--device", "cuda"])) is None
    for extra in (["--enforce-eager"], ["--speculative", "mtp"], ["--tp", "2"]):
        assert speculative_arg(parse(base + ["--device", "cuda", *extra])) is not None, extra
    path, folder, _ = grafted  # a graft named explicitly is used
    assert speculative_arg(parse(["generate", "x", "--model", path, "--device", "cuda",
                                  "--speculative-model", folder])) is not None
