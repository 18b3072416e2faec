"""GGUF files served kept quantized: every block type decoded bit-exactly as the ``gguf``
package dequantizes it, and tiny models of each supported architecture (written with the
``gguf`` package's writer and quantizers) against transformers reading the same file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf_writer import quantized, write_gguf
from test_parity import our_logits

from dist_engine import LLM, SamplingParams
from dist_engine.kernels import qlinear
from dist_engine.quant.gguf import DECODERS, decode
from dist_engine.weights.registry import resolve_model

PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4]


@pytest.mark.parametrize("type_name", sorted(DECODERS))
def test_blocks_decode_to_exactly_the_gguf_packages_values(type_name):
    """Quantized by the gguf package where it can (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4), random
    valid blocks otherwise (K-quants, NVFP4); the packed kernel layout dequantizes to the same
    bits as ``gguf.quants.dequantize``."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    rows, cols = 40, 512
    raw = quantized(type_name, rng.normal(0, 0.1, (rows, cols)), rng)
    ref = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols))
    gq = decode(raw, type_name, cols)
    assert torch.equal(gq.dequantize(), ref)
    assert torch.equal(qlinear.dequantize(gq.pack()), ref)
    half = decode(raw[5:17], type_name, cols)  # any rows, decoded alone
    assert torch.equal(half.dequantize(), ref[5:17])


def _gguf(tmp_path, arch: str, types: dict[str, str], **kw) -> str:
    kw = {"heads": 2, "kv_heads": 1, **kw} if arch.startswith("qwen3") else kw  # head_dim 128
    return write_gguf(str(tmp_path / f"{arch}.gguf"), arch, types, **kw)


def _hf(gguf_file: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_file), gguf_file=os.path.basename(gguf_file),
                                                dtype=torch.float32).eval()


# q/k/v in different types where files mix them (llama.cpp's Q4_K_M keeps v in Q6_K)
MODELS = {
    "llama": {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q5_K", "token_embd": "Q8_0"},
    "qwen2": {"default": "Q4_1", "attn_k": "Q5_0", "token_embd": "Q4_0"},
    "qwen3": {"default": "Q8_0", "attn_q": "MXFP4", "ffn_up": "Q5_1", "token_embd": "F16"},
    "qwen3moe": {"default": "Q4_0", "ffn_down_exps": "Q6_K", "ffn_gate_exps": "NVFP4", "token_embd": "Q8_0"},
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_gguf_model_matches_transformers_reading_the_same_file(tmp_path, arch):
    gguf_file = _gguf(tmp_path, arch, MODELS[arch], tied=arch != "qwen2")
    hf = _hf(gguf_file)
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0]
        expected = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    folder = resolve_model(gguf_file)
    ours = our_logits(folder, PROMPT, [len(PROMPT)])
    torch.testing.assert_close(ours, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    with LLM(gguf_file, max_model_len=128, num_kv_blocks=32, speculative="none") as llm:
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True))
        assert out[0].outputs[0].token_ids == expected
        formats = llm.engine.cache_info
        quant_bytes = sum(v for k, v in formats.items() if k.startswith("weight_bytes[gguf"))
        assert quant_bytes > 0.5 * formats["weight_bytes"]  # products kept quantized


@pytest.mark.distributed
def test_gguf_tp2_equals_tp1(tmp_path, ray_session):
    """Row-parallel shards of K-quant rows (groups of 32 inside super-blocks of 256) and the
    vocabulary-split quantized embedding and head give TP=1's tokens and logprobs."""
    gguf_file = _gguf(tmp_path, "llama", MODELS["llama"])
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    kw = dict(max_model_len=128, num_kv_blocks=32, speculative="none")
    with LLM(gguf_file, **kw) as llm:
        one = llm.generate(prompt_token_ids=[PROMPT], sampling_params=sp)[0].outputs[0]
    with LLM(gguf_file, tensor_parallel_size=2, **kw) as llm:
        two = llm.generate(prompt_token_ids=[PROMPT], sampling_params=sp)[0].outputs[0]
    assert two.token_ids == one.token_ids
    for a, b in zip(one.logprobs, two.logprobs):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_unsupported_block_type_is_named(tmp_path):
    from gguf import GGMLQuantizationType, GGUFWriter

    path = str(tmp_path / "q2k.gguf")
    w = GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 84), dtype=np.uint8), raw_shape=(8, 84),
                 raw_dtype=GGMLQuantizationType.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from dist_engine.quant.gguf import iter_tensors
    from dist_engine.weights.gguf_meta import GGUF_LINK, write_config

    folder = tmp_path / "f"
    folder.mkdir()
    write_config({"num_attention_heads": 1, "num_key_value_heads": 1, "bos_token_id": 1,
                  "eos_token_id": 2}, str(folder))
    os.symlink(path, folder / GGUF_LINK)
    with pytest.raises(ValueError, match="type Q2_K, which is not supported"):
        list(iter_tensors(str(folder)))


def test_torch_path_of_other_devices_matches_the_kernels(tmp_path, monkeypatch):
    """Without the C kernels (GPUs, no compiler) a weight is dequantized for each product and
    an embedding gathers its rows with torch operators: the same logits, to rounding."""
    gguf_file = _gguf(tmp_path, "qwen2", MODELS["qwen2"])
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    kw = dict(max_model_len=128, num_kv_blocks=32, speculative="none", skip_tokenizer_init=True)
    with LLM(gguf_file, **kw) as llm:
        fast = llm.generate(prompt_token_ids=[PROMPT], sampling_params=sp)[0].outputs[0]
    monkeypatch.setattr(qlinear, "available", lambda: False)
    with LLM(gguf_file, **kw) as llm:
        assert llm.engine.executor.worker.runner.model.model.cpu_decoder is None
        slow = llm.generate(prompt_token_ids=[PROMPT], sampling_params=sp)[0].outputs[0]
    assert slow.token_ids == fast.token_ids
    for a, b in zip(fast.logprobs, slow.logprobs):
        assert all(abs(a[t] - b[t]) < 1e-4 for t in a)
