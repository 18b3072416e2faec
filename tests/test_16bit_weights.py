"""16-bit checkpoints served with fp32 activations keep their product weights at 2 bytes (CPU
panels of the checkpoint's own dtype, ``layers.linear.checkpoint_16bit``): the outputs are
bitwise those of the same values held in fp32, from half the weight bytes. A bf16 or fp16
safetensors checkpoint and a GGUF F16 / BF16 file (llama.cpp's F16) alike."""

from __future__ import annotations

import glob
import shutil

import pytest
import torch
from gguf_writer import write_gguf
from safetensors.torch import load_file, save_file

from dist_engine import LLM, SamplingParams
from dist_engine.kernels import qlinear
from dist_engine.layers import linear as layers_linear

pytestmark = pytest.mark.skipif(not qlinear.available(), reason="no C compiler for the kernels")
PROMPTS = [[1, 17, 230, 45, 99, 3, 150], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)


def _cast(src: str, dst: str, dtype: torch.dtype) -> str:
    """A copy of the checkpoint at ``src`` with every float tensor stored as ``dtype``."""
    shutil.copytree(src, dst)
    for f in glob.glob(f"{dst}/*.safetensors"):
        tensors = load_file(f)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, f,
                  metadata={"format": "pt"})
    return dst


def _serve(path: str) -> tuple[dict[str, int], list, bool]:
    """Per-format weight bytes, greedy outputs with logprobs, whether the C decoder ran them."""
    with LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=32,
             speculative="none") as llm:
        formats = {k: v for k, v in llm.engine.cache_info.items() if k.startswith("weight_bytes[")}
        outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
        return formats, outs, llm.engine.executor.worker.runner.model.model.cpu_decoder is not None


def _same(a: list, b: list) -> bool:
    return all(x.token_ids == y.token_ids and x.logprobs == y.logprobs for x, y in zip(a, b))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_safetensors_keep_2_byte_weights_with_fp32_bits(tiny_models, tmp_path, half):
    stored = _cast(tiny_models("llama"), str(tmp_path / "half"), half)
    widened = _cast(stored, str(tmp_path / "fp32"), torch.float32)  # the same values in fp32
    formats, outs, driver = _serve(stored)
    ref_formats, ref_outs, _ = _serve(widened)
    name = str(half).removeprefix("torch.")
    assert driver and formats[f"weight_bytes[{name} (packed)]"] > 0
    assert "weight_bytes[float32 (packed)]" not in formats  # every product kept 16-bit
    assert formats[f"weight_bytes[{name} (packed)]"] * 2 == ref_formats["weight_bytes[float32 (packed)]"]
    assert _same(outs, ref_outs)


def test_gguf_f16_file_keeps_its_16bit_weights(tmp_path, monkeypatch):
    """llama.cpp's F16 file (one BF16 tensor kind mixed in): fp16 / bf16 panels, and the same
    bits as the file's values widened to fp32 panels."""
    path = write_gguf(str(tmp_path / "f16.gguf"), "llama", {"default": "F16", "ffn_down": "BF16", "token_embd": "F16"})
    formats, outs, driver = _serve(path)
    assert driver and formats["weight_bytes[float16 (packed)]"] > 0 and formats["weight_bytes[bfloat16 (packed)]"] > 0
    monkeypatch.setattr(layers_linear, "checkpoint_16bit", lambda module: None)  # widen to fp32 at load
    ref_formats, ref_outs, _ = _serve(path)
    assert "weight_bytes[float16 (packed)]" not in ref_formats
    assert _same(outs, ref_outs)
