"""The draft head: the main lm head restricted to a draft vocabulary, in 16-bit weights."""

from __future__ import annotations

import torch
from torch import nn

from dist_engine.config import EngineConfig
from dist_engine.kernels.linear import PanelWeight
from dist_engine.kernels.qlinear import S8, QWeight, dequantize
from dist_engine.layers.linear import pack_weight, project
from dist_engine.quant import ON_LOAD_METHODS
from dist_engine.quant.groups import GroupQuant
from dist_engine.quant.linear import quantize_dense
from dist_engine.weights.loader import iter_checkpoint


class DraftHead(nn.Module):
    """The main lm head restricted to a draft vocabulary (replicated: no collective), with its
    weights in ``dtype`` (16-bit by default: a draft only needs the top token). On CPU the
    product kernel reads bf16 panels straight into fp32 activations (other dtypes it packs in
    the weight's own); on other devices the weight and the input are cast."""

    def __init__(self, weight: torch.Tensor, vocab_ids: torch.Tensor, dtype: torch.dtype | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V', H]
        self.vocab_ids = vocab_ids  # [V'] long
        self.weight_packed = None
        if isinstance(dtype, str):  # "int8" / "int4": quantized as --quantization does
            quantize_dense(self, dtype)
        else:
            pack_weight(self, dtype)
        if self.weight_packed is None:  # no CPU product kernel: a dense weight of that dtype
            self.weight = nn.Parameter(weight.to(dtype if isinstance(dtype, torch.dtype) else weight.dtype),
                                       requires_grad=False)

    @property
    def dtype(self) -> torch.dtype | str:
        """What the head's weights are held in: a dtype, or "int8" / "int4"."""
        packed = self.weight_packed
        if isinstance(packed, QWeight):
            return "int8" if packed.kind == S8 else "int4"
        return packed.panels.dtype if isinstance(packed, PanelWeight) else self.weight.dtype

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V'] fp32
        if self.weight_packed is None:
            h = h.to(self.weight.dtype)
        return project(self, h).float()


def draft_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype | str:
    """``SpeculativeConfig.draft_dtype`` as a torch dtype ("auto": 16-bit), or "int8" / "int4"."""
    if name in ON_LOAD_METHODS:
        return name
    if name != "auto":
        return getattr(torch, name)
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def full_head_weight(runner, cfg: EngineConfig) -> torch.Tensor:
    """The whole ``[vocab, H]`` head: at TP=1 this rank's dense copy if one is kept (the head's
    own when unpacked, the embedding's when tied) or its quantized weight dequantized, else
    read from the checkpoint (dequantized where the checkpoint keeps it quantized)."""
    if runner.comm.world_size == 1:
        head = runner.model.lm_head.weight
        if head.numel():
            return head.data
        table = runner.model.model.embed_tokens
        if cfg.model.tie_word_embeddings and table.weight.numel():
            return table.weight.data
        packed = runner.model.lm_head.weight_packed
        if isinstance(packed, QWeight) and packed.in_perm is None:
            return dequantize(packed, runner.dtype)
    want = "model.embed_tokens.weight" if cfg.model.tie_word_embeddings else "lm_head.weight"
    for name, lazy in iter_checkpoint(cfg.model.path):
        if name == want:
            full = lazy[:]
            return (full.dequantize() if isinstance(full, GroupQuant) else full).to(runner.dtype)
    raise ValueError(f"{cfg.model.path} has no {want}")
