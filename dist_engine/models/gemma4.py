"""Gemma 4 text decoder (transformers' ``gemma4``: dense, the 26B-A4B MoE, the small E models)
with Hugging Face module names; no collectives here (they live in ``dist_engine.layers``).

A layer is ``sliding_attention`` (attends its window, own group of paged blocks) or
``full_attention`` (global; may have its own head dim and fewer KV heads). Attention: q, k, v
RMSNorms per head (v's without a scale), RoPE per layer type (the global layers' proportional:
only a quarter of each head turns), scale 1. With ``attention_k_eq_v`` a global layer has no
``v_proj``: K = rope(k_norm(k_proj x)), V = v_norm(k_proj x). Every sub-block's output is
normed before its residual add; the MoE variant adds a routed-expert block beside the dense MLP;
each layer ends scaled by ``layer_scalar``. E models: per-layer embeddings feed a gated residual
in every layer, and the last ``num_kv_shared_layers`` layers attend an earlier layer's K/V
(``SharedKV``: no cache of their own). Logits are soft-capped.

Tensor parallelism: query/KV heads split per layer (``HeadPartition`` of that layer's KV heads),
MLPs by intermediate dim, routed experts by expert, embeddings by vocabulary row; the router
and the small per-layer-input projections are replicated (cheaper than a collective).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.config import ModelConfig
from dist_engine.config.gemma4 import GEMMA4_MULTIMODAL, SLIDING, kv_sources
from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import HeadPartition, split_range
from dist_engine.kv_cache.kinds import PagedKV, SharedKV, group_name
from dist_engine.layers.attention import AttentionMetadata, paged_attention, write_kv
from dist_engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from dist_engine.layers.fused_experts import FusedExperts
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.linear import ColumnParallelLinear, RowParallelLinear, merged_column
from dist_engine.layers.loading import copy_checked
from dist_engine.layers.rotary import RotaryEmbedding
from dist_engine.models.gemma4_parts import (
    Gemma4RMSNorm,
    Gemma4TextRouter,
    replicated,
    unit_rms_norm,
)
from dist_engine.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)
gelu_tanh = functools.partial(F.gelu, approximate="tanh")


def rotary_by_layer_type(cfg: ModelConfig, dtype: torch.dtype, max_positions: int
                         ) -> dict[str, RotaryEmbedding]:
    """One rotary table per layer type (each type has one head dim and RoPE setting)."""
    out = {}
    for layer_type, theta, scaling in cfg.rope_by_layer_type:
        dim = cfg.head_dim_of(cfg.layer_types.index(layer_type))
        out[layer_type] = RotaryEmbedding(dim, max_positions, theta, dict(scaling) if scaling else None, dtype)
    return out


class Gemma4TextAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator, layer: int, rotary: RotaryEmbedding,
                 dtype: torch.dtype, reads: int | None = None) -> None:
        super().__init__()
        sliding = cfg.layer_types[layer] == SLIDING
        hd = self.head_dim = cfg.head_dim_of(layer)
        p = self.part = HeadPartition.for_rank(cfg.num_attention_heads, cfg.kv_heads_of(layer),
                                               comm.world_size, comm.rank)
        self.local_num_heads, self.local_num_kv_heads = p.local_num_heads, p.local_num_kv_heads
        self.window = cfg.sliding_window if sliding else None
        self.group = group_name(self.window)
        # None: this layer computes and stores its K/V; ``reads``: another model's layer (drafters)
        self.kv_source = kv_sources(cfg)[layer] if reads is None else reads
        self.k_eq_v = cfg.attention_k_eq_v and not sliding
        shards = {"q": (p.q_start * hd, p.local_num_heads * hd, 0)}
        q_size, kv_size = p.local_num_heads * hd, p.local_num_kv_heads * hd
        if self.kv_source is None:
            shards["k"] = (p.kv_start * hd, kv_size, q_size)
            if not self.k_eq_v:
                shards["v"] = (p.kv_start * hd, kv_size, q_size + kv_size)
            self.k_norm = Gemma4RMSNorm(hd, cfg.rms_norm_eps, dtype)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, shards, cfg.attention_bias, dtype)
        self.q_norm = Gemma4RMSNorm(hd, cfg.rms_norm_eps, dtype)
        self.o_proj = RowParallelLinear((p.q_start * hd, q_size), cfg.hidden_size, comm,
                                        cfg.attention_bias, dtype)
        self.rotary_emb = rotary
        self.eps = cfg.rms_norm_eps

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv: LayerKV,
                meta: AttentionMetadata) -> torch.Tensor:
        meta = meta.for_group(self.group)
        T, D = x.shape[0], self.head_dim
        Hq, Hk = self.local_num_heads, self.local_num_kv_heads
        qkv = self.qkv_proj(x)  # [T, (Hq + Hk [+ Hk]) * D]
        q = self.q_norm(qkv[:, :Hq * D].view(T, Hq, D))
        if self.kv_source is not None:  # K/V were stored by an earlier layer of this step
            q = self.rotary_emb.rotate(positions, q)
        else:
            k = qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
            v = k if self.k_eq_v else qkv[:, (Hq + Hk) * D:].view(T, Hk, D)  # k_eq_v: raw k
            v = unit_rms_norm(v, self.eps)
            q, k = self.rotary_emb(positions, q, self.k_norm(k))
            write_kv(kv, k, v, meta)
        out = paged_attention(q, kv, meta, 1.0)  # [T, Hq, D]; q and k are normed: scale 1
        return self.o_proj(out.reshape(T, Hq * D))


class Gemma4TextMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = merged_column(cfg.hidden_size, [inter, inter], comm, dtype)
        self.down_proj = RowParallelLinear(split_range(inter, comm.world_size, comm.rank),
                                           cfg.hidden_size, comm, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, local_inter] each
        return self.down_proj(gelu_tanh(gate) * up)


class Gemma4TextDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: RotaryEmbedding,
                 dtype: torch.dtype, layer: int, reads: int | None = None, expert_cache=None) -> None:
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.dtype = dtype
        self.self_attn = Gemma4TextAttention(cfg, comm, layer, rotary, dtype, reads)
        shared = self.self_attn.kv_source is not None
        wide = 2 if cfg.use_double_wide_mlp and shared else 1
        self.mlp = Gemma4TextMLP(cfg, comm, cfg.intermediate_size * wide, dtype)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, Gemma4RMSNorm(H, eps, dtype))
        self.layer_scalar = nn.Parameter(torch.ones(1, dtype=dtype), requires_grad=False)
        self.per_layer_input = cfg.hidden_size_per_layer_input > 0
        if self.per_layer_input:
            P = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = replicated(H, P, dtype)
            self.per_layer_projection = replicated(P, H, dtype)
            self.post_per_layer_input_norm = Gemma4RMSNorm(H, eps, dtype)
        self.moe = cfg.n_routed_experts > 0
        if self.moe:  # routed experts beside the dense MLP, each normed before they are summed
            self.router = Gemma4TextRouter(H, cfg.n_routed_experts, cfg.num_experts_per_tok, eps, dtype)
            self.experts = FusedExperts(H, cfg.moe_intermediate_size, cfg.n_routed_experts, comm,
                                        dtype, gelu_tanh, expert_cache, layer,
                                        f"model.layers.{layer}.experts.", self.router)
            for name in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                         "pre_feedforward_layernorm_2"):
                setattr(self, name, Gemma4RMSNorm(H, eps, dtype))

    @property
    def cache_kind(self) -> PagedKV | SharedKV:
        a = self.self_attn
        if a.kv_source is not None:
            return SharedKV(a.kv_source, a.group)
        return PagedKV(a.local_num_kv_heads, a.head_dim, self.dtype, window=a.window)

    def load(self, which: str, full, shard_id: object = None) -> None:  # layer_scalar
        copy_checked(getattr(self, which).data, full[:])

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv: LayerKV, meta: AttentionMetadata,
                per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        # x [T, hidden]; per_layer_input [T, hidden_size_per_layer_input] (E models)
        h = self.self_attn(positions, self.input_layernorm(x), kv, meta)
        x, h = self.pre_feedforward_layernorm.add_forward(x, self.post_attention_layernorm(h))
        h = self.mlp(h)
        if self.moe:
            weights, ids = self.router(x)  # routed on the residual stream itself
            routed = self.experts(self.pre_feedforward_layernorm_2(x), weights, ids, x)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)
        x = x + self.post_feedforward_layernorm(h)
        if self.per_layer_input:
            g = gelu_tanh(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar


class Gemma4TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype,
                 max_positions: int, expert_cache=None) -> None:
        super().__init__()
        rotary = rotary_by_layer_type(cfg, dtype, max_positions)
        H, L, P = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, H, comm, dtype)
        # the embedding is scaled by sqrt(hidden), rounded to the model dtype as transformers does
        self.register_buffer("embed_scale", torch.tensor(H ** 0.5, dtype=dtype), persistent=False)
        self.layers = nn.ModuleList(
            Gemma4TextDecoderLayer(cfg, comm, rotary[cfg.layer_types[i]], dtype, i, expert_cache=expert_cache)
            for i in range(L))
        self.norm = Gemma4RMSNorm(H, cfg.rms_norm_eps, dtype)
        # the first KV-shared layer: from there on no layer stores K/V (None: every layer does)
        self.tail_start = next((i for i, src in enumerate(kv_sources(cfg)) if src is not None), None)
        self.per_layer_dim = P
        if P:  # per-layer embeddings: one [L * P] row per token, plus a projection of the embedding
            self.embed_tokens_per_layer = VocabParallelEmbedding(cfg.vocab_size_per_layer_input, L * P,
                                                                 comm, dtype)
            self.register_buffer("per_layer_embed_scale", torch.tensor(P ** 0.5, dtype=dtype),
                                 persistent=False)
            self.per_layer_model_projection = replicated(H, L * P, dtype)
            self.per_layer_projection_norm = Gemma4RMSNorm(P, cfg.rms_norm_eps, dtype)

    def per_layer_inputs(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[T, L, P]``: (norm(projection of the scaled embedding x) + the token's per-layer
        embedding) / sqrt(2)."""
        T, P = ids.shape[0], self.per_layer_dim
        token = (self.embed_tokens_per_layer(ids) * self.per_layer_embed_scale).view(T, -1, P)
        proj = self.per_layer_model_projection(x) * x.shape[-1] ** -0.5
        proj = self.per_layer_projection_norm(proj.view(T, -1, P))
        return (proj + token) * 2.0 ** -0.5

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerKV],
                meta: AttentionMetadata, return_prenorm: bool = False):
        x = self.embed_tokens(ids) * self.embed_scale  # [T, hidden]
        per_layer = self.per_layer_inputs(ids, x) if self.per_layer_dim else None
        rows = None
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            if i == self.tail_start and meta.tail_rows is not None:
                # the KV-shared layers store nothing: only the sampled rows go on (as
                # transformers does for its kept logits), with metadata of their own
                rows, T = meta.tail_rows, x.shape[0]  # [N] of the step's T
                x, positions, meta = x[rows], positions[rows], meta.tail
                per_layer = None if per_layer is None else per_layer[rows]
                if meta is None:  # no row is sampled: nothing left to compute
                    break
            x = layer(positions, x, kv, meta, None if per_layer is None else per_layer[:, i])
        out = (self.norm(x), x) if return_prenorm else (self.norm(x),)
        if rows is not None:  # [N, hidden] back to the step's rows; the others are never read
            out = tuple(x.new_zeros(T, x.shape[-1]).index_copy_(0, rows, o) for o in out)
        return out if return_prenorm else out[0]


class Gemma4ForCausalLM(nn.Module):
    """Also serves ``Gemma4ForConditionalGeneration`` checkpoints: their text weights live under
    ``model.language_model.*``; the vision / audio towers and their embedders are not loaded."""

    packed_modules = LlamaForCausalLM.packed_modules  # the same fused q/k/v and gate/up
    ignored_suffixes: tuple[str, ...] = ()
    TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype,
                 max_positions: int, expert_cache=None) -> None:
        """``expert_cache``: the MoE variant's routed experts are paged (one expert's slices of
        the fused tensors read at a time)."""
        super().__init__()
        self.config = cfg
        self.model = Gemma4TextModel(cfg, comm, dtype, max_positions, expert_cache)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, comm, dtype, tied)
        if cfg.tie_word_embeddings:
            self.ignored_suffixes = ("lm_head.weight",)
        self.softcap = cfg.final_logit_softcapping
        # checkpoints may keep k/v projections for the KV-shared layers, which never use them
        self.unused = tuple(f"model.layers.{i}.self_attn.{m}." for i, src in enumerate(kv_sources(cfg))
                            if src is not None for m in ("k_proj", "v_proj", "k_norm", "v_norm"))
        if expert_cache is not None and cfg.n_routed_experts:  # the cache reads these, not the loader
            self.unused += tuple(f"model.layers.{i}.experts." for i in range(cfg.num_hidden_layers))
        self.multimodal = cfg.architecture in GEMMA4_MULTIMODAL
        if self.multimodal and cfg.multimodal_towers and comm.rank == 0:
            log.info("%s: serving the text model; the %s tower(s) in the checkpoint are not loaded",
                     cfg.architecture, " and ".join(cfg.multimodal_towers))

    def checkpoint_name(self, name: str) -> str | None:
        """Conditional-generation checkpoints: the language model's tensors under our names,
        None for the towers (skipped)."""
        if not self.multimodal:
            return name
        if name.startswith(self.TOWERS):
            return None
        return "model." + name.removeprefix("model.language_model.") if name.startswith(
            "model.language_model.") else name

    def skip_tensor(self, name: str) -> bool:
        return name.startswith(self.unused)

    @property
    def tail_start(self) -> int | None:
        """The first layer that stores no K/V (the runner may then run only sampled rows there)."""
        return self.model.tail_start

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerKV],
                meta: AttentionMetadata, return_prenorm: bool = False):
        """Final-norm hidden states ``[T, hidden]`` (and, if asked, the pre-norm ones); with
        ``meta.tail_rows`` only those rows are computed (the rest are zero, never read)."""
        return self.model(ids, positions, kv_caches, meta, return_prenorm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
