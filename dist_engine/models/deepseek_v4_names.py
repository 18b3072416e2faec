"""Checkpoint names of DeepSeek-V4 -> this engine's (transformers') module names.

Released checkpoints use DeepSeek's names without a prefix (``embed.weight``,
``layers.3.attn.wq_a.weight``, ``layers.3.attn.compressor.ape``, ``layers.3.attn.indexer.wq_b``,
``layers.0.ffn.gate.tid2eid``, ``layers.3.ffn.experts.7.w1.weight``, ``layers.3.hc_attn_fn``,
``hc_head_fn``, ``norm.weight``, ``head.weight``, FP8 block scales as ``*.scale``, the MTP layer
as ``mtp.0.*``); transformers' ``save_pretrained`` writes the same names under ``model.``
(except ``head.weight``), with ``embed_tokens``, ``hc_head.hc_fn`` and ``weight_scale_inv``.
Both map onto one module tree; the experts keep their ``w1`` / ``w2`` / ``w3`` names, which the
model stacks (``packed_modules``).
"""

from __future__ import annotations

import re

# block-level renames, first match wins (prefix of the name inside a layer)
_PREFIXES = (
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("hc_attn_", "attn_hc."),
    ("hc_ffn_", "ffn_hc."),
    ("hc_head_", "hc_head.hc_"),
    ("attn.indexer.compressor.", "self_attn.compressor.indexer."),
    ("attn.indexer.weights_proj.", "self_attn.compressor.indexer.scorer.weights_proj."),
    ("attn.indexer.", "self_attn.compressor.indexer."),
    ("attn.", "self_attn."),
    ("ffn.", "mlp."),
)
# module names inside attention (its compressor and indexer included)
_ATTENTION = {"wq_a": "q_a_proj", "q_norm": "q_a_norm", "wq_b": "q_b_proj", "wkv": "kv_proj",
              "wgate": "gate_proj", "wo_a": "o_a_proj", "wo_b": "o_b_proj", "ape": "position_bias",
              "attn_sink": "sinks", "norm": "kv_norm"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "embed_tokens.weight": "model.embed_tokens.weight",
        "head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight", "norm.weight": "model.norm.weight"}
_LAYER = re.compile(r"(layers|mtp)\.(\d+)\.(.+)")


def block_name(rest: str) -> str:
    """A name inside one decoder (or MTP) layer, e.g. ``attn.wq_a.scale`` ->
    ``self_attn.q_a_proj.weight_scale_inv``."""
    if rest.endswith(".scale"):  # FP8 block scales as DeepSeek ships them
        rest = rest[: -len(".scale")] + ".weight_scale_inv"
    for old, new in _PREFIXES:
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    parts = rest.split(".")
    if parts[0] == "self_attn":
        parts = [parts[0]] + [_ATTENTION.get(p, p) for p in parts[1:-1]] + [_ATTENTION.get(parts[-1], parts[-1])]
    if parts[0] == "mlp" and parts[1:] == ["gate", "bias"]:
        parts[-1] = "e_score_correction_bias"
    return ".".join(parts)


def checkpoint_name(stored: str) -> str | None:
    """Our name for checkpoint tensor ``stored`` (None: a copy of a shared tensor, ignored)."""
    name = stored.removeprefix("model.")
    if name in _TOP:
        return _TOP[name]
    if name.startswith("hc_head"):
        return "model." + block_name(name)
    m = _LAYER.fullmatch(name)
    if m is None:
        return stored
    kind, index, rest = m.groups()
    if kind == "mtp":
        # the MTP layer shares the model's embedding and head; copies it may carry are ignored
        return None if rest in ("embed.weight", "head.weight", "emb.tok_emb.weight") else f"mtp.{index}.{block_name(rest)}"
    return f"model.layers.{index}.{block_name(rest)}"
