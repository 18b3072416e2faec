"""Paged experts on Qwen3.5-MoE: fused 3-D expert tensors (one expert's slice read), the hybrid
model's recurrent layers beside paged MoE blocks, the native MTP module (``mtp.*``) whose MoE
block pages through the same cache; and GGUF, which the cache refuses."""

from __future__ import annotations

import json
import os
import re

import pytest

from dist_engine import LLM, SamplingParams
from qwen3_5_harness import PROMPT

ENGINE = dict(skip_tokenizer_init=True, max_model_len=512, kv_cache_memory="8MiB", cpu_threads=1,
              state_checkpoint_interval=64)
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
PER_EXPERT = 24 * 1024  # gate/up [64, 64] and down [64, 32], fp32


def minimum_budget(path: str, **kw) -> int:
    with pytest.raises(ValueError, match=r"is below the minimum") as e:
        LLM(path, expert_cache_memory=1024, **ENGINE, **kw)
    return int(re.search(r"at least (\d+) bytes", str(e.value)).group(1))


def generate(llm, prompts):
    return [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]


def test_qwen3_5_moe_pages_fused_experts(qwen3_5_models, qwen3_5_generated):
    """Four MoE layers of 8 experts (2 per token) with 4 slots: transformers' tokens and the
    resident run's logprobs bit for bit, batched; with MTP K=2 its MoE block's 8 experts page
    too and the output stays plain decoding's."""
    path = qwen3_5_models("qwen3_5_moe")
    prompts = [PROMPT[:150], PROMPT[150:157]]
    with LLM(path, speculative="none", **ENGINE) as llm:
        resident = generate(llm, prompts)
    assert resident[0].token_ids == qwen3_5_generated("qwen3_5_moe")
    budget = minimum_budget(path, speculative="none") + 2 * PER_EXPERT
    with LLM(path, speculative="none", expert_cache_memory=budget, **ENGINE) as llm:
        paged = generate(llm, prompts)
        s = llm.engine.stats()["expert_cache"]
    assert [o.token_ids for o in paged] == [o.token_ids for o in resident]
    assert [o.logprobs for o in paged] == [o.logprobs for o in resident]
    assert s["num_slots"] == 4 and s["num_experts"] == 32
    assert s["hits"] > 0 and s["misses"] > 0 and s["evictions"] > 0
    with LLM(path, speculative="mtp", num_speculative_tokens=2, expert_cache_memory=budget, **ENGINE) as llm:
        spec = generate(llm, prompts)
        s = llm.engine.stats()["expert_cache"]
        assert llm.engine.spec_stats.num_draft_tokens > 0
    assert [o.token_ids for o in spec] == [o.token_ids for o in resident]
    assert s["num_experts"] == 40  # the MTP block's experts in the same cache


def test_gguf_experts_are_refused(qwen3_5_models, tmp_path):
    """A GGUF model has no safetensors headers to index its experts by: refused at start-up with
    what to do, before any weight is read (quantized safetensors experts page: see
    test_expert_cache_models.py)."""
    src = qwen3_5_models("qwen3_5_moe")
    for f in os.listdir(src):
        if f != "config.json":
            os.symlink(os.path.join(src, f), tmp_path / f)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gguf"}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="is a GGUF file, and the expert cache pages routed experts from "
                                         "safetensors checkpoints only"):
        LLM(str(tmp_path), expert_cache_memory="1MiB", speculative="none", **ENGINE)


def test_multimodal_checkpoint_names_index_as_the_loader_sees_them(tmp_path):
    """A multimodal Qwen3.5 checkpoint keeps the text model under ``model.language_model.``: the
    index maps names with the model's own ``checkpoint_name`` and reads one expert's slices of
    the fused tensors (other ranks' experts and the vision tower ignored)."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from dist_engine.experts.source import ExpertIndex, FileReader
    from dist_engine.models.qwen3_5 import Qwen3_5ForCausalLM

    gate_up, down = torch.randn(4, 6, 5), torch.randn(4, 5, 3)  # [E, 2I, H], [E, H, I]
    text = "model.language_model.layers.0.mlp.experts."
    save_file({text + "gate_up_proj": gate_up, text + "down_proj": down,
               "model.visual.blocks.0.mlp.experts.gate_up_proj": torch.zeros(2, 2, 2)},
              str(tmp_path / "model.safetensors"))
    model = SimpleNamespace(multimodal=True)
    prefix = "model.layers.0.mlp.experts."
    index = ExpertIndex(str(tmp_path), {prefix: (2, 2)}, lambda n: Qwen3_5ForCausalLM.checkpoint_name(model, n))
    assert sorted(index.refs) == [(prefix, 2), (prefix, 3)]
    reader = FileReader(index.expert_nbytes(), pin=False)
    try:
        got = reader.read(index.refs[prefix, 3])
        assert torch.equal(got["gate_proj.weight"], gate_up[3, :3]) and torch.equal(got["up_proj.weight"], gate_up[3, 3:])
        assert torch.equal(got["down_proj.weight"], down[3])
    finally:
        reader.close()
