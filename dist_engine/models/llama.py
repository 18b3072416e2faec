"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE) with Hugging Face module names.

Differences between the family members are config flags: qkv bias (Qwen2), per-head q/k RMSNorm
(Qwen3), sliding window (Mistral), explicit head_dim, tied embeddings. Tensor parallelism lives in
the layers (``dist_engine.layers``); this file contains no collectives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.config import ModelConfig
from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import HeadPartition, split_range
from dist_engine.kernels import fused
from dist_engine.kv_cache.kinds import PagedKV
from dist_engine.layers.attention import AttentionMetadata, paged_attention, write_kv
from dist_engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.linear import RowParallelLinear, merged_column, qkv_column
from dist_engine.layers.moe import SparseMoE, skipped_expert
from dist_engine.layers.norm import RMSNorm
from dist_engine.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from dist_engine.experts.cache import ExpertCache

KVCache = LayerKV  # K, V: [num_slots, local_num_kv_heads, head_dim] each (model dtype or FP8), or TurboQuantKV


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.part = HeadPartition.for_rank(cfg.num_attention_heads, cfg.num_key_value_heads,
                                           comm.world_size, comm.rank)
        p = self.part
        self.local_num_heads, self.local_num_kv_heads, self.head_dim = p.local_num_heads, p.local_num_kv_heads, hd
        self.scale = hd ** -0.5
        self.qkv_proj = qkv_column(cfg.hidden_size, hd, (p.q_start, p.local_num_heads),
                                   (p.kv_start, p.local_num_kv_heads), cfg.attention_bias, dtype)
        # HF gives o_proj a bias with attention_bias, except Qwen2 (bias on q/k/v only).
        o_bias = cfg.attention_bias and cfg.architecture != "Qwen2ForCausalLM"
        self.o_proj = RowParallelLinear((p.q_start * hd, p.local_num_heads * hd), cfg.hidden_size,
                                        comm, o_bias, dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
        self.qk_norm = cfg.qk_norm
        self.rotary_emb = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hk) * D]
        q_size, kv_size = self.local_num_heads * self.head_dim, self.local_num_kv_heads * self.head_dim
        v = qkv[:, q_size + kv_size:].view(T, self.local_num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qkv[:, :q_size + kv_size].split([q_size, kv_size], dim=-1)
            q = self.q_norm(q.reshape(T, self.local_num_heads, self.head_dim))
            k = self.k_norm(k.reshape(T, self.local_num_kv_heads, self.head_dim))
            q, k = self.rotary_emb(positions, q, k)
            write_kv(kv, k, v, meta)
        else:  # one C call rotates q and k and stores K and V where it applies
            q = self._rope_and_store(positions, qkv, kv, meta)
            if q is None:  # q and k heads are adjacent in qkv: rotate them in one call
                qk = qkv[:, :q_size + kv_size].reshape(T, self.local_num_heads + self.local_num_kv_heads, self.head_dim)
                q, k = self.rotary_emb.rotate(positions, qk).split([self.local_num_heads, self.local_num_kv_heads], dim=1)
                write_kv(kv, k, v, meta)
        out = paged_attention(q, kv, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(T, q_size))

    def _rope_and_store(self, positions: torch.Tensor, qkv: torch.Tensor, kv: KVCache,
                        meta: AttentionMetadata) -> torch.Tensor | None:
        """Rotated q ``[T, Hq, D]`` with K and V already in the cache (kernels/fused.c), or None
        where the kernel does not apply: FP8, TurboQuant or shared caches, calibration, sequence
        shards."""
        if kv.observe or not kv.plain or kv.shared or meta.write_index is not None:
            return None
        rot = self.rotary_emb
        return fused.rope_store(qkv, self.local_num_heads, self.local_num_kv_heads, self.head_dim, positions,
                                rot.cos, rot.sin, meta.slot_mapping, kv.k, kv.v)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        # fp8_block: DeepSeek-V3's dense layers (config rejects it for Llama-family attention)
        self.gate_up_proj = merged_column(cfg.hidden_size, [inter, inter], comm, dtype, cfg.fp8_block)
        self.down_proj = RowParallelLinear(split_range(inter, comm.world_size, comm.rank),
                                           cfg.hidden_size, comm, False, dtype, quant_block=cfg.fp8_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        gate_up = self.gate_up_proj(x)  # [T, 2 * local_inter]
        act = fused.silu_mul(gate_up)
        if act is None:
            gate, up = gate_up.chunk(2, dim=-1)  # [T, local_inter] each
            act = F.silu(gate) * up
        return self.down_proj(act)


class LlamaDecoderLayer(nn.Module):
    attention_class: type[nn.Module] = LlamaAttention  # (cfg, comm, rotary, dtype)

    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: RotaryEmbedding,
                 dtype: torch.dtype, layer: int = 0, expert_cache: ExpertCache | None = None) -> None:
        super().__init__()
        self.self_attn = self.attention_class(cfg, comm, rotary, dtype)
        # Qwen3-MoE: a sparse MoE block in the layers its config names
        self.mlp = (SparseMoE.from_config(cfg, comm, dtype, layer, expert_cache) if cfg.is_moe_layer(layer)
                    else LlamaMLP(cfg, comm, dtype))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.dtype, self.window = dtype, cfg.sliding_window

    @property
    def cache_kind(self) -> PagedKV:
        """Paged K/V of this rank's KV heads (MLA: one latent row serving as K and V); Mistral's
        layers attend a sliding window."""
        a = self.self_attn
        return PagedKV(a.local_num_kv_heads, a.head_dim, self.dtype,
                       shared_kv=getattr(a, "latent_cache", False), window=self.window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        h = self.self_attn(positions, self.input_layernorm(x), kv, meta)
        x, h = self.post_attention_layernorm.add_forward(x, h)  # x + h and its norm
        return x + self.mlp(h)


class LlamaModel(nn.Module):
    # (cfg, comm, rotary, dtype, layer index, expert cache)
    decoder_layer: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype,
                 max_positions: int, expert_cache: ExpertCache | None = None) -> None:
        super().__init__()
        # head_dim is the rotated part of a head (for MLA, qk_rope_head_dim)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                 cfg.rope_scaling_dict, dtype)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, comm, dtype)
        self.layers = nn.ModuleList(
            self.decoder_layer(cfg, comm, rotary, dtype, i, expert_cache) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # CPU: the layers of a decode step in one C call (kernels/decoder.py; same bits), set
        # by the model runner once the weights are packed
        self.cpu_decoder = None

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, return_prenorm: bool = False):
        x = self.embed_tokens(ids)  # [T, hidden]
        if self.cpu_decoder is None or self.cpu_decoder.forward(x, positions, kv_caches, meta) is None:
            for layer, kv in zip(self.layers, kv_caches):
                x = layer(positions, x, kv, meta)
        return (self.norm(x), x) if return_prenorm else self.norm(x)


class LlamaForCausalLM(nn.Module):
    model_class: type[nn.Module] = LlamaModel
    # checkpoint name -> (our module, shard id) where several tensors share one matmul
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # checkpoint tensors that are consumed by design without a parameter of their own
    ignored_suffixes = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype,
                 max_positions: int, expert_cache: ExpertCache | None = None) -> None:
        """``expert_cache``: MoE layers page their routed experts there instead of holding them."""
        super().__init__()
        self.config = cfg
        self.model = self.model_class(cfg, comm, dtype, max_positions, expert_cache)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, comm, dtype, tied)
        if cfg.tie_word_embeddings:
            # Some tied checkpoints still store lm_head.weight (a copy of the embedding).
            self.ignored_suffixes = (*self.ignored_suffixes, "lm_head.weight")

    def skip_tensor(self, name: str) -> bool:
        """A routed expert of another rank or of the expert cache: never loaded here."""
        return skipped_expert(self.model.layers, name)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, return_prenorm: bool = False):
        """Final-norm hidden states ``[T, hidden]`` of every input token (and, if asked, the
        same before the final norm)."""
        return self.model(ids, positions, kv_caches, meta, return_prenorm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        return self.lm_head(hidden)


