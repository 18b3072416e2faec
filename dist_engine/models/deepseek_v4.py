"""DeepSeek-V4 (``DeepseekV4ForCausalLM``) under transformers' module names; no collectives here.

Attention: a low-rank query (``q_a_proj`` -> ``q_a_norm`` -> ``q_b_proj``, each head
RMS-normalised), one KV head used as both K and V (``kv_proj`` -> ``kv_norm``), RoPE on the last
``qk_rope_head_dim`` dims of each head with consecutive pairs rotated (``main`` RoPE on sliding
layers, ``compress`` RoPE with YaRN on compressed ones) and the inverse rotation of the output,
per-head sinks, and a grouped low-rank output (``o_a_proj`` per head group, then ``o_b_proj``).
Every layer attends a raw window of its last ``sliding_window`` tokens; compressed layers add
rows from their compressor (``layers/compressor.py``): all of them (heavily compressed) or the
indexer's top-k (compressed sparse, ``layers/indexer.py``); ``layers/compressed_attention.py``
merges the parts. Residuals are ``hc_mult`` hyper-connection streams (``layers/
hyper_connection.py``) collapsed by ``hc_head`` before the final norm. MoE in every layer:
sqrt(softplus) routing with a correction bias, or hash routing by token id in the first layers;
SwiGLU inputs clamped.

Caches: each layer keeps its window as a paged window kind (blocks behind it are given back);
a compressed layer adds its compressed rows (and, CSA, indexer keys) as paged kinds of ratio m in
the full-attention group, and its compressors' open windows as a positional recurrent state.
Tensor parallelism splits heads by whole output groups; the KV head, the compressors and the
indexer are replicated (sequence shards, ``--dcp``, avoid storing their rows twice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dist_engine.config import ModelConfig
from dist_engine.config.deepseek_v4 import CSA, SLIDING
from dist_engine.distributed.comm import Communicator
from dist_engine.kv_cache.kinds import CacheKind, PagedKV, RecurrentState
from dist_engine.layers.attention import AttentionMetadata, write_kv
from dist_engine.layers.compressed_attention import CompressedPart, attend
from dist_engine.layers.compressor import Compressor, replicated
from dist_engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from dist_engine.layers.fp8 import FP8, dequantized
from dist_engine.layers.hyper_connection import HyperConnection, HyperHead
from dist_engine.layers.indexer import Indexer
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.linear import ColumnParallelLinear, RowParallelLinear
from dist_engine.layers.loading import copy_checked
from dist_engine.layers.moe import SparseMoE, skipped_expert
from dist_engine.layers.norm import Fp32RMSNorm, unweighted_rms_norm
from dist_engine.layers.rotary import TrailingRotary
from dist_engine.models import deepseek_v4_names as v4_names
from dist_engine.models.deepseek_v4_names import checkpoint_name

if TYPE_CHECKING:
    from dist_engine.experts.cache import ExpertCache


def rotaries(cfg: ModelConfig, max_positions: int, dtype: torch.dtype) -> dict[str, TrailingRotary]:
    """``main`` RoPE (sliding layers) and ``compress`` RoPE (compressed layers, their
    compressors and indexers)."""
    v4 = cfg.v4
    return {"main": TrailingRotary(v4.rope_dim, max_positions, cfg.rope_theta, cfg.rope_scaling_dict, dtype),
            "compress": TrailingRotary(v4.rope_dim, max_positions, v4.compress_rope_theta,
                                       v4.compress_rope_scaling_dict, dtype)}


def _write_rows(cache: LayerKV, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Completed rows ``[E, D]`` into their slots (-1: another shard stores that row)."""
    mine = slots >= 0
    r = rows[mine].unsqueeze(1)
    cache.write(slots[mine], r, r)


class DeepseekV4Attention(nn.Module):
    latent_cache = True  # one KV head serves as K and V: no separate V, no C kernel

    def __init__(self, cfg: ModelConfig, comm: Communicator, layer_type: str, ratio: int,
                 rotary: dict[str, TrailingRotary], dtype: torch.dtype) -> None:
        super().__init__()
        v4, H, D, hidden, eps = cfg.v4, cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size, cfg.rms_norm_eps
        groups = v4.o_groups // comm.world_size  # whole output groups per rank
        per_group = H // v4.o_groups
        g0 = comm.rank * groups
        self.head_start, self.local_num_heads = g0 * per_group, groups * per_group
        self.local_num_kv_heads, self.head_dim, self.groups, self.eps = 1, D, groups, eps
        quant, q_lora, o_lora = cfg.fp8_block, cfg.q_lora_rank, v4.o_lora_rank
        self.q_a_proj = replicated(hidden, q_lora, dtype, quant)
        self.q_a_norm = Fp32RMSNorm(q_lora, eps)
        self.q_b_proj = ColumnParallelLinear(q_lora, {None: (self.head_start * D, self.local_num_heads * D, 0)},
                                             False, dtype, quant)
        self.kv_proj = replicated(hidden, D, dtype, quant)
        self.kv_norm = Fp32RMSNorm(D, eps)
        self.o_a_proj = ColumnParallelLinear(per_group * D, {None: (g0 * o_lora, groups * o_lora, 0)}, False,
                                             dtype, quant)
        self.o_a_proj.keep_dense = True  # one weight block per group, read directly
        self.o_b_proj = RowParallelLinear((g0 * o_lora, groups * o_lora), hidden, comm, False, dtype,
                                          quant_block=quant)
        self.sinks = nn.Parameter(torch.empty(self.local_num_heads), requires_grad=False)  # fp32
        self.layer_type, self.ratio, self.dtype, self.scale = layer_type, ratio, dtype, D ** -0.5
        self.rotary = rotary["main" if layer_type == SLIDING else "compress"]
        self.window = PagedKV(1, D, dtype, shared_kv=True, window=v4.sliding_window)
        self.compressor = None
        if layer_type != SLIDING:
            self.compressor = Compressor(hidden, D, ratio, layer_type == CSA, rotary["compress"], eps, dtype)
        if layer_type == CSA:
            self.compressor.indexer = Indexer(hidden, q_lora, v4.index_n_heads, v4.index_head_dim, v4.index_topk,
                                              ratio, rotary["compress"], eps, dtype, quant)

    def load(self, which: str, full, shard_id: object = None) -> None:  # sinks [num_heads]
        copy_checked(self.sinks.data, full[self.head_start:self.head_start + self.local_num_heads].float())

    @property
    def indexer(self) -> Indexer | None:
        return getattr(self.compressor, "indexer", None)

    @property
    def cache_kinds(self) -> tuple[CacheKind, ...]:
        """Window K/V; with a compressor its rows (and indexer keys) and its rings."""
        if self.compressor is None:
            return (self.window,)
        c = self.compressor
        kinds: list[CacheKind] = [self.window, PagedKV(1, self.head_dim, self.dtype, shared_kv=True,
                                                       ratio=self.ratio, role="compressed K/V")]
        state = c.state_tensors("")
        if self.indexer is not None:
            kinds.append(PagedKV(1, self.indexer.head_dim, self.dtype, shared_kv=True, ratio=self.ratio,
                                 role="indexer keys"))
            state += self.indexer.state_tensors("index_")
        return (*kinds, RecurrentState(state, positional=True, role="compressor windows"))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, caches, meta: AttentionMetadata) -> torch.Tensor:
        T, h, D = x.shape[0], self.local_num_heads, self.head_dim
        qr = self.q_a_norm(self.q_a_proj(x))  # [T, q_lora_rank]
        q = self.rotary(positions, unweighted_rms_norm(self.q_b_proj(qr).view(T, h, D), self.eps))
        kv = self.rotary(positions, self.kv_norm(self.kv_proj(x))).view(T, 1, D)  # K = V
        caches = caches if isinstance(caches, tuple) else (caches,)
        wmeta = meta.for_group(self.window.group)
        write_kv(caches[0], kv, kv, wmeta)
        part = self._compressed(x, qr, positions, caches[1:], meta) if self.compressor is not None else None
        out = self.rotary(positions, attend(q, caches[0], wmeta, self.scale, self.sinks, part), inverse=True)
        return self.o_b_proj(self._grouped(out))  # [T, hidden]

    def _compressed(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, caches: tuple,
                    meta: AttentionMetadata) -> CompressedPart:
        """Run the compressors over the step (rows they complete go to the caches) and say
        which rows each query reads."""
        smeta, rows, state = meta.state, meta.rows[self.ratio], caches[-1]
        spans = list(zip(smeta.starts, smeta.lengths))
        lengths = torch.tensor(smeta.lengths, device=x.device)
        token_seq = torch.repeat_interleave(torch.arange(len(spans), device=x.device), lengths)
        _write_rows(caches[0], self.compressor(x, state, smeta, rows, token_seq, positions, ""), rows.write_slots)
        selected = None
        if self.indexer is not None:
            keys = caches[1]
            _write_rows(keys, self.indexer(x, state, smeta, rows, token_seq, positions, "index_"), rows.write_slots)
            selected = self.indexer.select(x, qr, positions, keys, rows, spans, meta.cp)
        return CompressedPart(caches[0], rows, positions, spans, token_seq, selected)

    def _grouped(self, out: torch.Tensor) -> torch.Tensor:
        """``[T, h, D]`` -> each head group through its block of ``o_a_proj``: ``[T, groups * o_lora]``."""
        T, g = out.shape[0], self.groups
        w = self.o_a_proj.weight
        w = dequantized(self.o_a_proj, out.dtype) if w.dtype == FP8 else w
        w = w.view(g, -1, w.shape[-1]).transpose(1, 2)  # [g, per_group * D, o_lora]
        y = torch.bmm(out.reshape(T, g, -1).transpose(0, 1), w)  # [g, T, o_lora]
        return y.transpose(0, 1).reshape(T, -1)


class DeepseekV4DecoderLayer(nn.Module):
    """Attention and MoE, each between a hyper-connection's collapse and expansion."""

    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: dict[str, TrailingRotary],
                 dtype: torch.dtype, layer_type: str, ratio: int, hashed: bool, layer: int = 0,
                 expert_cache: ExpertCache | None = None, expert_prefix: str | None = None) -> None:
        """``layer``: the checkpoint index (the order MoE blocks run in, for the expert cache);
        ``expert_prefix``: where its routed experts are (default ``model.layers.{layer}.mlp.experts.``)."""
        super().__init__()
        v4, H, eps = cfg.v4, cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = DeepseekV4Attention(cfg, comm, layer_type, ratio, rotary, dtype)
        self.mlp = SparseMoE(H, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.n_shared_experts,
                             cfg.num_experts_per_tok, 1, 1, True, cfg.routed_scaling_factor, comm, dtype,
                             cfg.fp8_block, cfg.moe_scoring, v4.swiglu_limit, cfg.vocab_size if hashed else None,
                             packed_experts=v4.expert_dtype == "fp4", layer=layer, expert_cache=expert_cache,
                             prefix=expert_prefix)
        self.input_layernorm = Fp32RMSNorm(H, eps)
        self.post_attention_layernorm = Fp32RMSNorm(H, eps)
        self.attn_hc = HyperConnection(H, v4.hc_mult, v4.hc_sinkhorn_iters, v4.hc_eps, eps)
        self.ffn_hc = HyperConnection(H, v4.hc_mult, v4.hc_sinkhorn_iters, v4.hc_eps, eps)

    @property
    def cache_kinds(self) -> tuple[CacheKind, ...]:
        return self.self_attn.cache_kinds

    def forward(self, positions: torch.Tensor, streams: torch.Tensor, caches, meta: AttentionMetadata,
                token_ids: torch.Tensor | None) -> torch.Tensor:
        """streams ``[T, hc_mult, hidden]`` -> the same after attention and MoE."""
        post, comb, x = self.attn_hc(streams)
        y = self.self_attn(positions, self.input_layernorm(x), caches, meta)
        streams = HyperConnection.expand(y, post, comb, streams)
        post, comb, x = self.ffn_hc(streams)
        y = self.mlp(self.post_attention_layernorm(x), token_ids)
        return HyperConnection.expand(y, post, comb, streams)


class DeepseekV4Model(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, max_positions: int,
                 expert_cache: ExpertCache | None = None) -> None:
        super().__init__()
        v4, H = cfg.v4, cfg.hidden_size
        rotary = rotaries(cfg, max_positions, dtype)
        self.hc_mult = v4.hc_mult
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, H, comm, dtype)
        self.layers = nn.ModuleList(
            DeepseekV4DecoderLayer(cfg, comm, rotary, dtype, t, m, h, i, expert_cache)
            for i, (t, m, h) in enumerate(zip(v4.layer_types, v4.compress_ratios, v4.hash_layers)))
        self.norm = Fp32RMSNorm(H, cfg.rms_norm_eps)
        self.hc_head = HyperHead(H, v4.hc_mult, v4.hc_eps, cfg.rms_norm_eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: AttentionMetadata,
                return_prenorm: bool = False):
        """Final-norm hidden states ``[T, hidden]``; with ``return_prenorm`` also the streams
        before ``hc_head`` flattened, ``[T, hc_mult * hidden]`` (what the MTP layer reads)."""
        x = self.embed_tokens(ids)  # [T, hidden]
        streams = x.unsqueeze(1).expand(-1, self.hc_mult, -1).contiguous()  # [T, n, hidden]
        for layer, caches in zip(self.layers, kv_caches):
            streams = layer(positions, streams, caches, meta, ids)
        out = self.norm(self.hc_head(streams))
        return (out, streams.flatten(1)) if return_prenorm else out


class DeepseekV4ForCausalLM(nn.Module):
    """Reads DeepSeek's released naming (``embed.weight``, ``layers.N.attn.wq_a``, ``ffn.experts.E.w1``,
    ``hc_attn_fn``, ``head.weight``, ``*.scale``) and transformers' (the same under ``model.``)."""

    # routed and shared experts' w1 / w3 stack into one gate-up product, w2 is the down product
    packed_modules = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None)}
    ignored_suffixes = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, max_positions: int,
                 expert_cache: ExpertCache | None = None) -> None:
        """``expert_cache``: every layer's routed experts (hash-routed ones included) are paged."""
        super().__init__()
        self.config = cfg
        self.model = DeepseekV4Model(cfg, comm, dtype, max_positions, expert_cache)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, comm, dtype, tied)

    @staticmethod
    def checkpoint_name(stored: str) -> str | None:
        return None if stored.startswith("mtp.") else checkpoint_name(stored)

    # the expert cache indexes the MTP layer's experts too (``mtp.0.mlp.experts.``)
    expert_checkpoint_name = staticmethod(v4_names.checkpoint_name)

    def skip_tensor(self, name: str) -> bool:
        """Another rank's routed expert: never read from the checkpoint here."""
        return skipped_expert(self.model.layers, name)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: AttentionMetadata,
                return_prenorm: bool = False):
        return self.model(ids, positions, kv_caches, meta, return_prenorm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        return self.lm_head(hidden)
