"""Tiny GGUF files written from scratch for the quantization tests (the ``gguf`` package's
writer and quantizers; block types it cannot quantize get random valid blocks)."""

from __future__ import annotations

import numpy as np

VOCAB = 320


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows, bytes per row]`` of valid blocks of ``type_name`` with random codes and small
    scales (weights of magnitude ~0.1)."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)

    def f16(lo: float, hi: float, shape) -> np.ndarray:
        return rng.uniform(lo, hi, shape).astype(np.float16).view(np.uint8).reshape(*shape[:-1], 2)

    if type_name in ("Q4_K", "Q5_K"):
        b[..., 0:2] = f16(1e-4, 3e-4, (rows, cols // block, 1))
        b[..., 2:4] = f16(1e-4, 3e-4, (rows, cols // block, 1))
    elif type_name == "Q6_K":
        b[..., 208:210] = f16(1e-4, 2e-4, (rows, cols // block, 1))
    elif type_name == "NVFP4":  # UE4M3 scales between 2^-6 and 2^-3 (no NaN)
        b[..., 0:4] = rng.integers(8, 32, (rows, cols // block, 4), dtype=np.uint8)
    else:
        raise ValueError(type_name)
    return b.reshape(rows, -1)


def quantized(type_name: str, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``w`` ``[rows, cols]`` in ``type_name``: the gguf package's quantizer where it has one."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    if type_name in ("Q4_K", "Q5_K", "Q6_K", "NVFP4"):
        return random_blocks(type_name, *w.shape, rng)
    return quants.quantize(w.astype(np.float32), qtype)


def write_gguf(path: str, arch: str, types: dict[str, str], seed: int = 0, hidden: int = 256,
               inter: int = 512, heads: int = 4, kv_heads: int = 2, layers: int = 2,
               experts: int = 4, moe_inter: int = 768, tied: bool = True) -> str:
    """A ``arch`` (llama, qwen2, qwen3, qwen3moe) model with random weights. ``types`` maps a
    tensor kind (``attn_q``, ``attn_k``, ``attn_v``, ``attn_output``, ``ffn_gate``, ``ffn_up``,
    ``ffn_down``, ``token_embd``, ``output``; ``*_exps`` for experts) to a GGML type name;
    ``"default"`` covers the rest of the matrices. (transformers reads Qwen3's head_dim and
    Qwen3-MoE's expert width from its own defaults, 128 and 768: tests keep to them.)"""
    from gguf import GGMLQuantizationType, GGUFWriter

    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    w = GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", 512)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.feed_forward_length", inter)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{arch}.vocab_size", VOCAB)
    if arch == "qwen3moe":
        w.add_uint32(f"{arch}.expert_count", experts)
        w.add_uint32(f"{arch}.expert_used_count", 2)
        w.add_uint32(f"{arch}.expert_feed_forward_length", moe_inter)
    # a byte-level BPE vocabulary: single characters, no merges
    w.add_tokenizer_model("gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_token_list([f"<s{i}>" if i < 3 else chr(0x100 + i) for i in range(VOCAB)])
    w.add_token_types([3 if i < 3 else 1 for i in range(VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def matrix(name: str, kind: str, rows: int, cols: int) -> None:
        t = types.get(kind, types["default"])
        if t in ("F32", "F16"):
            data = rng.normal(0, 0.08, (rows, cols)).astype(np.float32 if t == "F32" else np.float16)
            w.add_tensor(name, data)
            return
        data = quantized(t, rng.normal(0, 0.08, (rows, cols)), rng)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType[t])

    def vector(name: str, n: int, mean: float) -> None:
        w.add_tensor(name, rng.normal(mean, 0.1, n).astype(np.float32))

    matrix("token_embd.weight", "token_embd", VOCAB, hidden)
    vector("output_norm.weight", hidden, 1.0)
    if not tied:
        matrix("output.weight", "output", VOCAB, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", hidden, 1.0)
        vector(p + "ffn_norm.weight", hidden, 1.0)
        matrix(p + "attn_q.weight", "attn_q", heads * head_dim, hidden)
        matrix(p + "attn_k.weight", "attn_k", kv_heads * head_dim, hidden)
        matrix(p + "attn_v.weight", "attn_v", kv_heads * head_dim, hidden)
        matrix(p + "attn_output.weight", "attn_output", hidden, heads * head_dim)
        if arch == "qwen2":
            for kind, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                vector(p + f"attn_{kind}.bias", n * head_dim, 0.0)
        if arch in ("qwen3", "qwen3moe"):
            vector(p + "attn_q_norm.weight", head_dim, 1.0)
            vector(p + "attn_k_norm.weight", head_dim, 1.0)
        if arch == "qwen3moe":
            w.add_tensor(p + "ffn_gate_inp.weight", rng.normal(0, 0.1, (experts, hidden)).astype(np.float32))
            for kind, (rows, cols) in (("ffn_gate_exps", (moe_inter, hidden)),
                                       ("ffn_up_exps", (moe_inter, hidden)), ("ffn_down_exps", (hidden, moe_inter))):
                t = types.get(kind, types["default"])
                data = np.stack([quantized(t, rng.normal(0, 0.08, (rows, cols)), rng) for _ in range(experts)])
                w.add_tensor(p + kind + ".weight", data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType[t])
        else:
            matrix(p + "ffn_gate.weight", "ffn_gate", inter, hidden)
            matrix(p + "ffn_up.weight", "ffn_up", inter, hidden)
            matrix(p + "ffn_down.weight", "ffn_down", hidden, inter)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
