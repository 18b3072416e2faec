"""DeepSeek-V3-style multi-token-prediction (MTP) layer around a Llama-family decoder block.

One MTP step at position p reads the main model's hidden state of p and the embedding of token
p + 1, and its output predicts token p + 2::

    x = eh_proj(concat(enorm(embed(t[p+1])), hnorm(h[p])))   # order per model
    g = decoder_block(x)                                       # its own paged KV
    logits = lm_head(shared_head.norm(g))                      # head shared with the main model

Module names follow the checkpoints that ship MTP weights (DeepSeek-V3, GLM-4.5):
``model.layers.{num_hidden_layers}.{enorm,hnorm,eh_proj,shared_head.norm,self_attn,mlp,...}``.
The embedding and head are the main model's; their copies in a checkpoint are ignored.
No collectives here: the block's parallel layers hold them, ``eh_proj`` is replicated.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_engine.config import ModelConfig
from dist_engine.distributed.comm import Communicator
from dist_engine.layers.attention import AttentionMetadata
from dist_engine.layers.linear import ColumnParallelLinear
from dist_engine.layers.norm import RMSNorm
from dist_engine.layers.rotary import RotaryEmbedding
from dist_engine.models.llama import KVCache, LlamaDecoderLayer, LlamaForCausalLM


class SharedHead(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps, dtype)


class LlamaMTPLayer(LlamaDecoderLayer):
    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: RotaryEmbedding,
                 dtype: torch.dtype, emb_first: bool) -> None:
        super().__init__(cfg, comm, rotary, dtype)
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps, dtype)
        self.eh_proj = ColumnParallelLinear(2 * H, {None: (0, H, 0)}, False, dtype)  # replicated
        self.shared_head = SharedHead(H, cfg.rms_norm_eps, dtype)
        self.emb_first = emb_first

    def forward(self, positions: torch.Tensor, emb: torch.Tensor, hidden: torch.Tensor,
                kv: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """emb ``[T, H]`` of tokens p + 1, hidden ``[T, H]`` of positions p -> raw output ``[T, H]``."""
        e, h = self.enorm(emb), self.hnorm(hidden)
        x = self.eh_proj(torch.cat([e, h] if self.emb_first else [h, e], dim=-1))  # [T, H]
        return super().forward(positions, x, kv, meta)


class LlamaMTP(nn.Module):
    """Holds MTP layer 0 under its checkpoint name, ``model.layers.{num_hidden_layers}``
    (chained steps reuse it, as engines do for DeepSeek-V3)."""

    packed_modules = LlamaForCausalLM.packed_modules
    ignored_suffixes = ("embed_tokens.weight", "shared_head.head.weight", "rotary_emb.inv_freq")

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, max_positions: int,
                 emb_first: bool) -> None:
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                 cfg.rope_scaling_dict, dtype)
        self.layer_index = cfg.num_hidden_layers
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict(
            {str(self.layer_index): LlamaMTPLayer(cfg, comm, rotary, dtype, emb_first)})

    @property
    def layer(self) -> LlamaMTPLayer:
        return self.model.layers[str(self.layer_index)]

    def prefix(self) -> str:
        return f"model.layers.{self.layer_index}."
