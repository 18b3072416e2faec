"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention and mixture of experts,
under Hugging Face module names. No collectives here: they live in the layers.

MLA caches one latent per token, ``[kv_lora_rank + qk_rope_head_dim]``: the normalised compressed
KV ``c`` and the shared rotated key ``k_pe``. The up-projection ``kv_b_proj`` is absorbed instead
of expanding the cache: per head, ``q_nope`` is mapped into the latent space by ``W_UK`` so that
``q_nope . k_nope = (q_nope W_UK) . c``; attention runs as one-KV-head attention of
``[q_nope W_UK, q_pe]`` over ``[c, k_pe]`` with the latent as the value as well; the first
``kv_lora_rank`` output dims are mapped back by ``W_UV``. The same path serves prefill and decode.
Heads are split over TP ranks; the latent is replicated (DCP shards it by sequence instead).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_engine.config import ModelConfig
from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import split_range
from dist_engine.layers.attention import AttentionMetadata, paged_attention, write_kv
from dist_engine.layers.fp8 import FP8, dequantized
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.linear import ColumnParallelLinear, RowParallelLinear
from dist_engine.layers.norm import RMSNorm
from dist_engine.layers.rotary import RotaryEmbedding
from dist_engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm (transformers uses its default)


def replicated(in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
               quant: tuple[int, int] | None) -> ColumnParallelLinear:
    return ColumnParallelLinear(in_features, {None: (0, out_features, 0)}, bias, dtype, quant)


def by_heads(in_features: int, per_head: int, heads: tuple[int, int], dtype: torch.dtype,
             quant: tuple[int, int] | None) -> ColumnParallelLinear:
    start, n = heads
    return ColumnParallelLinear(in_features, {None: (start * per_head, n * per_head, 0)}, False, dtype, quant)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(q/k head dim), times mscale(mscale_all_dim)^2 under YaRN, as DeepSeek defines it."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling_dict or {}
    if rs.get("rope_type", rs.get("type")) == "yarn" and rs.get("mscale_all_dim") and rs["factor"] > 1:
        m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
        scale *= m * m
    return scale


class DeepseekV3Attention(nn.Module):
    latent_cache = True  # the cache holds one latent per token; K and V share it

    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        super().__init__()
        H, hidden = cfg.num_attention_heads, cfg.hidden_size
        self.Dn, self.Dr, self.Dv, self.L = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                             cfg.v_head_dim, cfg.kv_lora_rank)
        heads = split_range(H, comm.world_size, comm.rank)
        self.local_num_heads = heads[1]
        self.local_num_kv_heads, self.head_dim = 1, self.L + self.Dr  # the cache's shape per token
        qk, quant = self.Dn + self.Dr, cfg.fp8_block
        self.q_lora = cfg.q_lora_rank is not None
        if self.q_lora:
            self.q_a_proj = replicated(hidden, cfg.q_lora_rank, cfg.attention_bias, dtype, quant)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS, dtype)
            self.q_b_proj = by_heads(cfg.q_lora_rank, qk, heads, dtype, quant)
        else:
            self.q_proj = by_heads(hidden, qk, heads, dtype, quant)
        self.kv_a_proj_with_mqa = replicated(hidden, self.L + self.Dr, cfg.attention_bias, dtype, quant)
        self.kv_a_layernorm = RMSNorm(self.L, LORA_NORM_EPS, dtype)
        self.kv_b_proj = by_heads(self.L, self.Dn + self.Dv, heads, dtype, quant)
        self.kv_b_proj.keep_dense = True  # absorbed: its weight is read directly, never packed
        self.o_proj = RowParallelLinear((heads[0] * self.Dv, heads[1] * self.Dv), hidden, comm,
                                        cfg.attention_bias, dtype, quant_block=quant)
        self.rotary_emb = rotary
        self.interleaved = cfg.rope_interleave
        self.scale = softmax_scale(cfg)

    def _rope(self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor):
        if self.interleaved:  # pairs (x0, x1), (x2, x3)... -> halves, as transformers does
            q_pe = torch.cat((q_pe[..., 0::2], q_pe[..., 1::2]), dim=-1)
            k_pe = torch.cat((k_pe[..., 0::2], k_pe[..., 1::2]), dim=-1)
        return self.rotary_emb(positions, q_pe, k_pe)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv: LayerKV,
                meta: AttentionMetadata) -> torch.Tensor:
        T, h = x.shape[0], self.local_num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(T, h, self.Dn + self.Dr).split([self.Dn, self.Dr], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.L, self.Dr], dim=-1)  # [T, L], [T, Dr]
        q_pe, k_pe = self._rope(positions, q_pe, k_pe.view(T, 1, self.Dr))
        latent = torch.cat((self.kv_a_layernorm(c).view(T, 1, self.L), k_pe), dim=-1)  # [T, 1, L+Dr]
        w = self.kv_b_proj.weight
        w = (dequantized(self.kv_b_proj, x.dtype) if w.dtype == FP8 else w).view(h, self.Dn + self.Dv, self.L)
        w_uk, w_uv = w[:, :self.Dn], w[:, self.Dn:]  # [h, Dn, L], [h, Dv, L]
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, h, L]
        write_kv(kv, latent, latent, meta)
        out = paged_attention(torch.cat((q_lat, q_pe), dim=-1), kv, meta, self.scale)  # [T, h, L+Dr]
        o = torch.bmm(out[..., :self.L].transpose(0, 1), w_uv.transpose(1, 2))  # [h, T, Dv]
        return self.o_proj(o.transpose(0, 1).reshape(T, h * self.Dv))


class DeepseekV3DecoderLayer(LlamaDecoderLayer):
    """MLA attention; a dense MLP or the sparse MoE block per the config (the Llama layer)."""

    attention_class = DeepseekV3Attention


class DeepseekV3Model(LlamaModel):
    """Embedding, DeepSeek-V3 decoder layers, final norm; the forward pass is the Llama one."""

    decoder_layer = DeepseekV3DecoderLayer


class DeepseekV3ForCausalLM(LlamaForCausalLM):
    """The Llama wrapper (LM head, tied embeddings, expert skipping) around DeepseekV3Model;
    only gate/up are stacked (its attention projections load as they are)."""

    model_class = DeepseekV3Model
    packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
