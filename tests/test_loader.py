"""Loader and config errors name the problem."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_engine import LLM
from dist_engine.config import ModelConfig
from dist_engine.distributed.comm import NullCommunicator
from dist_engine.models import model_class
from dist_engine.weights.loader import load_weights


def _copy(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)
    return dst


def _load(path: str) -> None:
    cfg = ModelConfig.from_pretrained(path)
    load_weights(model_class(cfg.architecture)(cfg, NullCommunicator(), torch.float32, 64), path)


def test_missing_tensor(tiny_models, tmp_path):
    p = _copy(tiny_models("qwen2"), str(tmp_path / "m"),
              lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors for: model\.layers\.1\.self_attn\.qkv_proj\.weight \(parts \['k'\]\)"):
        _load(p)


def _set(name: str, value: torch.Tensor):
    def edit(t):
        t[name] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 95)),
     r"model\.layers\.0\.mlp\.down_proj\.weight.*\(64, 95\)"),
    (_set("model.norm.weight", torch.ones(1)), r"model\.norm\.weight"),  # must not broadcast
    (_set("model.layers.0.mystery.weight", torch.zeros(3)), r"model\.layers\.0\.mystery\.weight"),
], ids=["wrong-shape", "no-broadcast", "unexpected"])
def test_bad_tensor_is_named(tiny_models, tmp_path, edit, message):
    p = _copy(tiny_models("qwen2"), str(tmp_path / "m"), edit)
    with pytest.raises(ValueError, match=message):
        _load(p)


def test_sharded_checkpoint_with_index(tiny_models, tmp_path):
    src = tiny_models("qwen3")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    os.remove(dst / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(dst / fname))
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _load(str(dst))


def test_unsupported_architecture_and_bad_settings(tiny_models, tmp_path):
    dst = tmp_path / "gpt"
    shutil.copytree(tiny_models("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*not supported"):
        LLM(str(dst), skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="neither a local HF-format folder, a .gguf file, nor a known name"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="tensor_parallel_size=4 exceeds num_key_value_heads=3"):
        LLM(tiny_models("llama"), tensor_parallel_size=4, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_models("llama"), dtype="float64", skip_tokenizer_init=True)
