"""A GGUF file's metadata as a Hugging Face config, its tensor names as HF names, and the folder
that serves it kept quantized.

``--model file.gguf`` (and the default model) becomes a small folder in the cache: config.json
built from the GGUF metadata (``quantization_config: {"quant_method": "gguf"}``), the tokenizer
transformers rebuilds from the metadata (chat template included), and ``model.gguf``, a link to
the file; the loader reads the tensors from the file itself (``quant/gguf.py``).
Architectures: llama (Llama, Mistral), qwen2, qwen3, qwen3moe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch

GGUF_LINK = "model.gguf"
_DONE = ".dist_engine_complete"
# GGUF architecture -> (HF architecture, model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
# stacked experts [E, out, in]: one HF tensor per expert
EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor (stacked experts: the prefix ``...mlp.experts.{e}.`` is
    completed per expert by the reader)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if m and m.group(2) in EXPERT_NAMES:
        return f"model.layers.{m.group(1)}.mlp.experts.{{}}.{EXPERT_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no equivalent in the supported architectures")


def rotary_order(rows: int, n_heads: int) -> torch.Tensor:
    """llama.cpp stores Llama's q/k rows interleaved for its rotary layout: HF row r is GGUF row
    ``order[r]`` (pairs within each head become two halves)."""
    return torch.arange(rows).view(n_heads, rows // n_heads // 2, 2).transpose(1, 2).reshape(-1)


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None or not f.data:
        return default
    value = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode()
    return value.tolist()[0] if len(value) == 1 else value.tolist()


def gguf_config(reader) -> dict:
    """config.json contents for the model in a ``GGUFReader``."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    hf_arch, model_type = ARCHITECTURES[arch]
    g = lambda k, d=None: field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_heads, hidden = g("attention.head_count"), g("embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": g("attention.head_count_kv", n_heads),
        "head_dim": g("attention.key_length") or g("rope.dimension_count") or hidden // n_heads,
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": g("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    scaling = g("rope.scaling.type")
    if scaling == "yarn":
        config["rope_scaling"] = {"rope_type": "yarn", "factor": float(g("rope.scaling.factor")),
                                  "original_max_position_embeddings": g("rope.scaling.original_context_length")}
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (only yarn)")
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF files with rope_freqs (Llama 3.1 frequency factors) are not supported; "
                         "convert the HF checkpoint instead")
    if arch == "qwen3moe":
        config.update(num_experts=g("expert_count"), num_experts_per_tok=g("expert_used_count"),
                      moe_intermediate_size=g("expert_feed_forward_length"), norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[])
        config["intermediate_size"] = config["intermediate_size"] or config["moe_intermediate_size"]
    return config


def gguf_folder(gguf_file: str, cache: str) -> str:
    """The folder that serves ``gguf_file`` kept quantized (made once per file version)."""
    from gguf import GGUFReader

    gguf_file = os.path.abspath(gguf_file)
    st = os.stat(gguf_file)
    key = hashlib.sha256(f"{gguf_file}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    base = os.path.splitext(os.path.basename(gguf_file))[0]
    folder = os.path.join(cache, "gguf-models", f"{base}-{key}")
    if os.path.isfile(os.path.join(folder, _DONE)):
        return folder
    os.makedirs(folder, exist_ok=True)
    config = gguf_config(GGUFReader(gguf_file))
    config["quantization_config"] = {"quant_method": "gguf"}
    write_config(config, folder)
    save_tokenizer(gguf_file, folder)
    link = os.path.join(folder, GGUF_LINK)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(gguf_file, link)
    open(os.path.join(folder, _DONE), "w").close()
    return folder


def write_config(config: dict, folder: str) -> None:
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, f)


def save_tokenizer(gguf_file: str, out_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_file)),
                                        gguf_file=os.path.basename(gguf_file))
    tok.save_pretrained(out_dir)
