"""Quantized safetensors checkpoints kept quantized: compressed-tensors (written by its own
library), GPTQ, AWQ, FP8, ModelOpt NVFP4, and ``--quantization int8|int4`` at load; each
against the float model of the weights its format stands for (logits close, greedy
identical), TP=2, and the errors a user can act on."""

from __future__ import annotations

import re

import pytest
import quant_writers as W
import torch
from test_parity import our_logits

from dist_engine import LLM, SamplingParams
from dist_engine.config import ModelConfig
from dist_engine.kernels import decoder, qlinear
from dist_engine.quant.groups import GroupQuant, ShardError, quantize

PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33]
KW = dict(skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=32, speculative="none")

CT = W.compressed_tensors_checkpoint
FORMATS = {
    "ct-int4-asym-g32": lambda p: CT(p, num_bits=4, type="int", symmetric=False, strategy="group", group_size=32),
    "ct-int4-sym-g64": lambda p: CT(p, num_bits=4, type="int", symmetric=True, strategy="group", group_size=64),
    "ct-int8-channel": lambda p: CT(p, num_bits=8, type="int", symmetric=True, strategy="channel"),
    "ct-fp8-channel": lambda p: CT(p, num_bits=8, type="float", symmetric=True, strategy="channel"),
    "ct-fp8-tensor": lambda p: CT(p, num_bits=8, type="float", symmetric=True, strategy="tensor"),
    "ct-nvfp4": lambda p: CT(p, num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16),
    "ct-mxfp4": lambda p: CT(p, num_bits=4, type="float", symmetric=True, strategy="group", group_size=32,
                             scale_dtype=torch.uint8),
    "gptq-int4-g32": lambda p: W.gptq_checkpoint(p),
    "gptq-int4-act-order": lambda p: W.gptq_checkpoint(p, act_order=True),
    "gptq-int8-v2": lambda p: W.gptq_checkpoint(p, bits=8, group=64, v2=True),
    "awq-int4-g32": lambda p: W.awq_checkpoint(p),
    "fp8-tensor": lambda p: W.fp8_checkpoint(p, "tensor"),
    "fp8-block": lambda p: W.fp8_checkpoint(p, "block"),
    "modelopt-nvfp4": lambda p: W.modelopt_nvfp4_checkpoint(p),
}


def reference(model) -> tuple[torch.Tensor, list[int]]:
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT])).logits[0].float()
        greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    return logits, greedy


def greedy(path: str, **kw) -> list[int]:
    with LLM(path, **KW, **kw) as llm:
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True))
        return out[0].outputs[0].token_ids


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_checkpoint_kept_quantized_matches_its_dequantized_weights(tmp_path, fmt):
    ref_model = FORMATS[fmt](str(tmp_path))
    ref_logits, ref_tokens = reference(ref_model)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert cfg.quantization is not None
    ours = our_logits(str(tmp_path), PROMPT, [len(PROMPT)])
    torch.testing.assert_close(ours, ref_logits, atol=1e-4 * ref_logits.abs().max().item(), rtol=0)
    assert greedy(str(tmp_path)) == ref_tokens


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantization_at_load_runs_the_quantized_weights(tiny_models, method):
    """``--quantization``: every product weight (the head too, at 8 bits under int4)
    group-quantized at load; the engine computes with exactly those values."""
    path = tiny_models("qwen2")
    with torch.inference_mode():
        from conftest import hf_model

        model = hf_model(path)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name:  # the head keeps 8 bits under int4
                eight = method == "int8" or name == "lm_head.weight"
                p.copy_(quantize(p, 8 if eight else 4, 32, eight).dequantize())
    ref_logits, ref_tokens = reference(model)
    assert greedy(path, quantization=method) == ref_tokens
    with LLM(path, **KW, quantization=method) as llm:
        info = llm.engine.cache_info
        assert info[f"weight_bytes[{method} g32]"] > 0 and info["weight_bytes[int8 g32]"] > 0
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            temperature=0, max_tokens=1, logprobs=5))
    lps = out[0].outputs[0].logprobs[0]
    ref = torch.log_softmax(ref_logits[-1], -1)
    assert all(abs(lp - ref[t].item()) < 1e-4 for t, lp in lps.items())


def test_quantization_at_load_on_the_hybrid_qwen3_5_model(qwen3_5_models):
    """``--quantization int4`` on Qwen3.5-MoE: the Gated DeltaNet projections (one fused
    ``in_proj``), gated attention, router, experts, shared expert and head (8 bits) are all quantized and
    computed with exactly those values (transformers holding the same int4 values is the
    reference); the router and the depthwise conv stay dense, as in vLLM; the layers stay on
    the Python path (the one-call C decoder does not know them)."""
    from conftest import hf_model

    path = qwen3_5_models("qwen3_5_moe")
    with torch.inference_mode():
        model = hf_model(path)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or "embed_tokens" in name:
                continue
            eight = name == "lm_head.weight"  # the head keeps 8 bits under int4
            if p.dim() == 2 or name.endswith(("gate_up_proj", "down_proj")):  # experts [E, out, in]
                p.copy_(quantize(p.reshape(-1, p.shape[-1]), 8 if eight else 4, 32, eight).dequantize().view_as(p))
    ref_logits, ref_tokens = reference(model)
    with LLM(path, **KW, quantization="int4", cpu_threads=1) as llm:  # tiny shapes: one thread
        ours = llm.engine.executor.worker.runner.model
        assert getattr(ours.model, "cpu_decoder", None) is None
        assert decoder.CPUDecoder.attach(ours.model) is None  # asked directly, it declines
        dense = [n for n, m in ours.named_modules() if getattr(m, "weight", None) is not None
                 and m.weight.dim() == 2 and m.weight.numel() and "embed_tokens" not in n]
        assert {n.split(".", 3)[-1] for n in dense} == {"linear_attn.conv1d", "mlp.gate"}
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True, logprobs=5))[0].outputs[0]
    assert out.token_ids == ref_tokens
    ref = torch.log_softmax(ref_logits[-1], -1)
    assert all(abs(lp - ref[t].item()) < 1e-4 for t, lp in out.logprobs[0].items())


def test_fp8_qwen3_5_with_unconverted_layers(qwen3_5_models, tmp_path):
    """A block-FP8 Qwen3.5-MoE checkpoint as Qwen's FP8 releases are: layer 0 keeps
    ``in_proj_a`` / ``in_proj_b`` unconverted beside FP8 ``in_proj_qkv`` / ``in_proj_z`` (the
    fused ``in_proj`` is held dense with the FP8 parts' exact values), the other layers' four
    parts all FP8 (packed as one quantized weight), attention, shared experts and ``out_proj``
    FP8 (partial tile rows: 40-row shared-expert parts in 32-row tiles; grids one tile wide:
    32-input expert down_proj); = transformers holding the same values."""
    from conftest import hf_model

    src, path = qwen3_5_models("qwen3_5_moe"), str(tmp_path / "fp8")
    unconverted = ("model.layers.0.linear_attn.in_proj_a.weight", "model.layers.0.linear_attn.in_proj_b.weight")
    values = W.fp8_block_copy(src, path, dense=lambda name: name in unconverted)
    with torch.inference_mode():
        model = hf_model(src)
        params = dict(model.named_parameters())
        for name, v in values.items():
            if ".experts." in name:  # saved per expert; transformers holds [E, out, in] stacks
                layer, e, proj = re.match(r"(.*\.experts)\.(\d+)\.(\w+)_proj\.weight", name).groups()
                stack, at = (f"{layer}.down_proj", 0) if proj == "down" else (
                    f"{layer}.gate_up_proj", 0 if proj == "gate" else v.shape[0])
                params[stack][int(e), at:at + v.shape[0]] = v
            else:
                params[name].copy_(v)
    ref_logits, ref_tokens = reference(model)
    with LLM(path, **KW, cpu_threads=1) as llm:
        layers = llm.engine.executor.worker.runner.model.model.layers
        assert not isinstance(layers[0].linear_attn.in_proj.weight_packed, qlinear.QWeight)
        assert isinstance(layers[1].linear_attn.in_proj.weight_packed, qlinear.QWeight)
        assert isinstance(layers[3].self_attn.o_proj.weight_packed, qlinear.QWeight)
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True, logprobs=5))[0].outputs[0]
    assert out.token_ids == ref_tokens
    ref = torch.log_softmax(ref_logits[-1], -1)
    assert all(abs(lp - ref[t].item()) < 1e-4 for t, lp in out.logprobs[0].items())


@pytest.mark.distributed
def test_tp2_equals_tp1_on_quantized_weights(tmp_path, ray_session):
    """Row-parallel shards split on group boundaries (asymmetric int4, packed zero points cut
    by rows): a compressed-tensors checkpoint gives TP=1's tokens at TP=2."""
    FORMATS["ct-int4-asym-g32"](str(tmp_path))
    assert greedy(str(tmp_path), tensor_parallel_size=2) == greedy(str(tmp_path))


def test_shards_that_cut_groups_are_refused():
    """A TP slice must hold whole groups: with activation order a shard's inputs are spread
    over the groups."""
    K, G = 128, 32
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    gq = GroupQuant(torch.zeros(8, K, dtype=torch.uint8), torch.ones(8, K // G), None, "u4", perm=perm)
    with pytest.raises(ShardError, match="activation order"):
        gq.cols(0, 64)
    ordered = GroupQuant(torch.zeros(8, K, dtype=torch.uint8), torch.ones(8, K // G), None, "u4")
    with pytest.raises(ShardError, match="shard boundaries at multiples of 32"):
        ordered.cols(0, 48)


def test_errors_name_the_method(tmp_path, tiny_models):
    from dist_engine.config.args import EngineArgs

    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported"):
        ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                               "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                               "quantization_config": {"quant_method": "bitsandbytes"}})
    W.awq_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match=r"already quantized \(awq\); --quantization int4"):
        EngineArgs(model=str(tmp_path), quantization="int4", speculative="none").engine_config(str(tmp_path))
    assert EngineArgs(model=str(tmp_path), quantization="awq", speculative="none").engine_config(
        str(tmp_path)).quantization is None
    with pytest.raises(ValueError, match="is not a gptq checkpoint"):
        EngineArgs(quantization="gptq", speculative="none").engine_config(tiny_models("llama"))
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(quantization="int3")


@pytest.mark.skipif(not qlinear.has_int8_activations(), reason="no AVX-512 VNNI on this CPU")
def test_int8_activations_stay_close_to_the_float_product(tmp_path, caplog):
    W.gptq_checkpoint(str(tmp_path))
    with caplog.at_level("WARNING", logger="dist_engine.quant.linear"):
        with LLM(str(tmp_path), **KW, int8_activations=True) as llm:
            out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
                temperature=0, max_tokens=1, logprobs=3))
    # prefix caching is on (KW): the user is told greedy output may part from plain decoding
    assert any("with prefix caching" in r.getMessage() for r in caplog.records)
    ref = torch.log_softmax(our_logits(str(tmp_path), PROMPT, [len(PROMPT)])[-1], -1)
    for tok, lp in out[0].outputs[0].logprobs[0].items():
        assert abs(lp - ref[tok].item()) < 0.05
