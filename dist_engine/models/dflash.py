"""DFlash block-diffusion drafter (z-lab's ``DFlashDraftModel``), checkpoint module names.

Context: the target's outputs of layers ``target_layer_ids`` at a verified position,
concatenated, become ``c = hidden_norm(fc(features))``; every drafter layer stores
``K = rope(k_norm(k_proj c))``, ``V = v_proj c`` for that position in its own paged cache (the
target's block ids and slots). A proposal block for a sequence whose next position is ``P`` is
``[known token, mask, ..., mask]`` at positions ``P .. P + B - 1``, embedded by the target's raw
embedding rows: each layer attends, without a causal mask, the cached context (positions
``< P``) and the block's own K/V (Qwen3 attention: q/k RMSNorms, RoPE, scale head_dim^-0.5),
then a SiLU MLP; the final norm's rows 1..B-1 go through the target's head. The drafter is
small and replicated: every rank holds and runs all of it (no collective).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.config.dflash import DFlashConfig
from dist_engine.distributed.comm import NullCommunicator
from dist_engine.kv_cache.kinds import PagedKV
from dist_engine.layers.attention import AttentionMetadata, write_kv
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.linear import ColumnParallelLinear, RowParallelLinear, merged_column
from dist_engine.layers.norm import RMSNorm
from dist_engine.layers.rotary import RotaryEmbedding
from dist_engine.models.llama import LlamaForCausalLM


class DFlashAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        D, Hq, Hk = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.num_heads, self.num_kv_heads = D, Hq, Hk
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, {"q": (0, Hq * D, 0), "k": (0, Hk * D, Hq * D),
                                                               "v": (0, Hk * D, (Hq + Hk) * D)},
                                             cfg.attention_bias, dtype)
        self.o_proj = RowParallelLinear((0, Hq * D), cfg.hidden_size, NullCommunicator(), cfg.attention_bias, dtype)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.rotary_emb = rotary

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, D, Hq, Hk = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)
        q = self.q_norm(qkv[:, :Hq * D].view(T, Hq, D))
        k = self.k_norm(qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D))
        return q, k, qkv[:, (Hq + Hk) * D:].view(T, Hk, D)

    def context(self, positions: torch.Tensor, c: torch.Tensor, kv: LayerKV, meta: AttentionMetadata) -> None:
        """Store the K/V of context states ``c`` ``[T, hidden]`` at ``positions``."""
        _, k, v = self._split(c)
        write_kv(kv, self.rotary_emb.rotate(positions, k), v, meta)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv: LayerKV, ctx_slots: torch.Tensor,
                ctx_valid: torch.Tensor) -> torch.Tensor:
        """Blocks ``x`` ``[N * B, hidden]`` at ``positions`` ``[N * B]``; each row of block n
        attends the cached slots ``ctx_slots[n]`` ``[N, C]`` (where ``ctx_valid``) and all of
        block n."""
        N, C = ctx_slots.shape
        B = x.shape[0] // N
        q, k, v = self._split(x)
        q, k = self.rotary_emb(positions, q, k)
        ck, cv = kv.gather(ctx_slots, q.dtype)  # [N, C, Hk, D]
        keys = torch.cat([ck, k.view(N, B, *k.shape[1:])], dim=1).transpose(1, 2)  # [N, Hk, C + B, D]
        vals = torch.cat([cv, v.view(N, B, *v.shape[1:])], dim=1).transpose(1, 2)
        mask = torch.cat([ctx_valid, ctx_valid.new_ones(N, B)], dim=1)[:, None, None, :]  # [N, 1, 1, C + B]
        out = F.scaled_dot_product_attention(q.view(N, B, self.num_heads, -1).transpose(1, 2), keys, vals,
                                             attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(N * B, -1))  # scale: head_dim ** -0.5


class DFlashMLP(nn.Module):
    def __init__(self, cfg: DFlashConfig, dtype: torch.dtype) -> None:
        super().__init__()
        null = NullCommunicator()
        self.gate_up_proj = merged_column(cfg.hidden_size, [cfg.intermediate_size] * 2, null, dtype)
        self.down_proj = RowParallelLinear((0, cfg.intermediate_size), cfg.hidden_size, null, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DFlashDecoderLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.self_attn = DFlashAttention(cfg, rotary, dtype)
        self.mlp = DFlashMLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    @property
    def cache_kind(self) -> PagedKV:  # every KV head on every rank (the drafter is replicated)
        return PagedKV(self.self_attn.num_kv_heads, self.self_attn.head_dim, self.dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv: LayerKV, ctx_slots: torch.Tensor,
                ctx_valid: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), kv, ctx_slots, ctx_valid)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraftModel(nn.Module):
    packed_modules = LlamaForCausalLM.packed_modules  # the same fused q/k/v and gate/up

    def __init__(self, cfg: DFlashConfig, target_hidden: int, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.head_dim, max_positions + cfg.block_size, cfg.rope_theta, None, dtype)
        self.layers = nn.ModuleList(DFlashDecoderLayer(cfg, rotary, dtype) for _ in range(cfg.num_hidden_layers))
        self.fc = ColumnParallelLinear(len(cfg.target_layer_ids) * target_hidden,
                                       {None: (0, cfg.hidden_size, 0)}, False, dtype)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def write_context(self, positions: torch.Tensor, features: torch.Tensor, caches: list[LayerKV],
                      meta: AttentionMetadata) -> None:
        """features ``[T, len(target_layer_ids) * target hidden]`` of verified ``positions``."""
        c = self.hidden_norm(self.fc(features))  # [T, hidden]
        for layer, kv in zip(self.layers, caches):
            layer.self_attn.context(positions, c, kv, meta)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, caches: list[LayerKV],
                ctx_slots: torch.Tensor, ctx_valid: torch.Tensor) -> torch.Tensor:
        """Final-norm states ``[N * B, hidden]`` of the blocks ``x`` (embedded block tokens)."""
        for layer, kv in zip(self.layers, caches):
            x = layer(positions, x, kv, ctx_slots, ctx_valid)
        return self.norm(x)
