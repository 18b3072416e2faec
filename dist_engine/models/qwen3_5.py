"""Qwen3.5 / Qwen 3.6 text models (``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM`` and the text
part of their ``ForConditionalGeneration`` checkpoints) under Hugging Face module names.

A hybrid stack: the layers ``layer_types`` calls ``linear_attention`` mix tokens with Gated
DeltaNet (``linear_attn``, a per-sequence recurrent state, ``layers/gated_delta.py``), the
``full_attention`` ones with gated attention (``self_attn``: the query projection also yields a
per-head output gate, interleaved ``[q_h | gate_h]``; per-head q/k norm; rotary on the first
``partial_rotary_factor`` of each head, to which the multimodal rotary reduces for text). Every
RMSNorm scales by ``1 + w`` (``OffsetRMSNorm``) except DeltaNet's gated output norm. The MLP is
SwiGLU, or (MoE) softmax top-k routed experts plus a sigmoid-gated shared expert. No collectives
here: they live in the layers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.config import ModelConfig
from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import HeadPartition, split_range
from dist_engine.kv_cache.kinds import CacheKind, PagedKV, RecurrentState
from dist_engine.layers.attention import AttentionMetadata, paged_attention, write_kv
from dist_engine.layers.elementwise import rowwise
from dist_engine.layers.embedding import VocabParallelEmbedding
from dist_engine.layers.gated_delta import CHUNK, DepthwiseConv, Heads, gated_delta
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    SegmentedColumnLinear,
)
from dist_engine.layers.loading import copy_checked
from dist_engine.layers.moe import SharedExperts, SparseMoE
from dist_engine.layers.norm import GatedRMSNorm, OffsetRMSNorm
from dist_engine.layers.rotary import RotaryEmbedding
from dist_engine.layers.state_cache import LayerState
from dist_engine.models.llama import LlamaForCausalLM, LlamaMLP

if TYPE_CHECKING:
    from dist_engine.experts.cache import ExpertCache

log = logging.getLogger(__name__)


def linear_heads(cfg: ModelConfig, tp: int, rank: int) -> tuple[int, Heads]:
    """(first key head, this rank's heads): whole key heads per rank, each with its value
    heads, so a rank's recurrent state needs nothing from other ranks."""
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    if tp > nk:
        raise ValueError(f"tensor_parallel_size={tp} cannot split the linear-attention heads: "
                         f"{nk} key heads (each serving {nv // nk} of the {nv} value heads) go to "
                         f"ranks whole; use at most {nk} ranks")
    start, n = split_range(nk, tp, rank)
    return start, Heads(n, n * (nv // nk), cfg.linear_key_head_dim, cfg.linear_value_head_dim)


class Qwen3_5GatedDeltaNet(nn.Module):
    """``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a`` run as one matmul
    (``in_proj``); conv, delta rule and state per ``layers/gated_delta.py``; then the gated norm
    and ``out_proj`` (row-parallel over value heads)."""

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, layer: int) -> None:
        super().__init__()
        self.layer, self.dtype = layer, dtype
        first, h = linear_heads(cfg, comm.world_size, comm.rank)
        self.heads = h
        group = h.value_heads // h.key_heads
        dk, dv, kd = h.key_dim, h.value_dim, cfg.linear_num_key_heads * h.key_dim
        self.value_start = first * group
        qk, vn = h.key_heads * dk, h.value_heads
        C = h.conv_channels
        qkv = [(first * dk, qk, 0), (kd + first * dk, qk, qk), (2 * kd + self.value_start * dv, vn * dv, 2 * qk)]
        self.in_proj = SegmentedColumnLinear(cfg.hidden_size, {
            "qkv": qkv,
            "z": [(self.value_start * dv, vn * dv, C)],
            "b": [(self.value_start, vn, C + vn * dv)],
            "a": [(self.value_start, vn, C + vn * dv + vn)],
        }, dtype)
        self.kernel = cfg.linear_conv_kernel_dim
        self.conv1d = DepthwiseConv(qkv, C, self.kernel, dtype)
        self.dt_bias = nn.Parameter(torch.empty(vn, dtype=dtype), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(vn, dtype=dtype), requires_grad=False)
        self.norm = GatedRMSNorm(dv, cfg.rms_norm_eps, dtype)
        self.out_proj = RowParallelLinear((self.value_start * dv, vn * dv), cfg.hidden_size, comm, False, dtype)

    def load(self, which: str, full, shard_id: object = None) -> None:  # A_log, dt_bias [Hv]
        copy_checked(getattr(self, which).data, full[self.value_start:self.value_start + self.heads.value_heads])

    @property
    def cache_kind(self) -> RecurrentState:
        h = self.heads
        return RecurrentState((("conv", (h.conv_channels, self.kernel - 1), self.dtype),
                               ("ssm", (h.value_heads, h.key_dim, h.value_dim), torch.float32)),
                              grid=CHUNK)

    def forward(self, x: torch.Tensor, state: LayerState, meta: AttentionMetadata) -> torch.Tensor:
        if meta.state is None or meta.split_tokens is not None:
            # the state advances through every token in order: each rank that holds this layer
            # runs all of a step's tokens (CP ranks do not split a hybrid model's tokens)
            raise RuntimeError("a Gated DeltaNet layer needs every token of the step and each "
                             "sequence's state slot (AttentionMetadata.state)")
        T, h = x.shape[0], self.heads
        vn, dv = h.value_heads, h.value_dim
        mixed, z, b, a = self.in_proj(x).split([h.conv_channels, vn * dv, vn, vn], dim=-1)
        beta = rowwise(torch.sigmoid, b).float()  # [T, Hv]
        g = -self.A_log.float().exp() * rowwise(F.softplus, a.float() + self.dt_bias.float())  # log decay
        core = gated_delta(mixed, g, beta, self.conv1d.weight, h, state, meta.state, self.layer)
        out = self.norm(core.reshape(T * vn, dv), z.reshape(T * vn, dv))  # [T * Hv, dv]
        return self.out_proj(out.view(T, vn * dv))


class Qwen3_5Attention(nn.Module):
    """Full attention with an output gate: ``q_proj`` yields ``[q_h | gate_h]`` per head; the
    attention output is multiplied by ``sigmoid(gate)`` before ``o_proj``. Heads split over
    ranks as in the Llama family (``HeadPartition``)."""

    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        super().__init__()
        D = cfg.head_dim
        p = HeadPartition.for_rank(cfg.num_attention_heads, cfg.num_key_value_heads, comm.world_size, comm.rank)
        self.local_num_heads, self.local_num_kv_heads, self.head_dim = p.local_num_heads, p.local_num_kv_heads, D
        self.dtype, self.scale, self.rotary_dim = dtype, D ** -0.5, cfg.rotary_dim
        qn, kn = p.local_num_heads, p.local_num_kv_heads
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, {
            "q": (p.q_start * 2 * D, qn * 2 * D, 0),
            "k": (p.kv_start * D, kn * D, qn * 2 * D),
            "v": (p.kv_start * D, kn * D, (qn * 2 + kn) * D),
        }, cfg.attention_bias, dtype)
        self.o_proj = RowParallelLinear((p.q_start * D, qn * D), cfg.hidden_size, comm, cfg.attention_bias, dtype)
        self.q_norm = OffsetRMSNorm(D, cfg.rms_norm_eps, dtype)
        self.k_norm = OffsetRMSNorm(D, cfg.rms_norm_eps, dtype)
        self.rotary_emb = rotary

    @property
    def cache_kind(self) -> PagedKV:
        return PagedKV(self.local_num_kv_heads, self.head_dim, self.dtype)

    def _rope(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim  # x [T, heads, D]: rotary on the first r dims of each head
        return torch.cat([self.rotary_emb.rotate(positions, x[..., :r]), x[..., r:]], dim=-1)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv: LayerKV,
                meta: AttentionMetadata) -> torch.Tensor:
        T, D, qn, kn = x.shape[0], self.head_dim, self.local_num_heads, self.local_num_kv_heads
        qg, k, v = self.qkv_proj(x).split([qn * 2 * D, kn * D, kn * D], dim=-1)
        q, gate = qg.view(T, qn, 2 * D).split([D, D], dim=-1)  # [T, Hq, D] each
        q = self._rope(positions, self.q_norm(q.reshape(T * qn, D)).view(T, qn, D))
        k = self._rope(positions, self.k_norm(k.reshape(T * kn, D)).view(T, kn, D))
        write_kv(kv, k, v.view(T, kn, D), meta)
        out = paged_attention(q, kv, meta, self.scale)  # [T, Hq, D]
        return self.o_proj((out * rowwise(torch.sigmoid, gate)).reshape(T, qn * D))


class Qwen3_5MoeSparseMoeBlock(SparseMoE):
    """Softmax top-k routed experts (renormalised) plus ``shared_expert`` scaled per token by
    ``sigmoid(shared_expert_gate(x))``; one all-reduce for both (the gate is replicated, so it
    scales each rank's partial of the shared expert)."""

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, layer: int = 0,
                 expert_cache: ExpertCache | None = None, prefix: str | None = None) -> None:
        super().__init__(cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, 0,
                         cfg.num_experts_per_tok, 1, 1, True, 1.0, comm, dtype, scoring="softmax",
                         layer=layer, expert_cache=expert_cache, prefix=prefix)
        inter = cfg.shared_expert_intermediate_size
        self.shared_expert = SharedExperts(cfg.hidden_size, inter, comm, dtype) if inter else None
        self.shared_expert_gate = (ColumnParallelLinear(cfg.hidden_size, {None: (0, 1, 0)}, False, dtype)
                                   if inter else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        weights, ids = self.gate(x)  # [T, k] each, identical on every rank
        y = self.routed(x, weights, ids)
        if self.shared_expert is not None:
            y = y + rowwise(torch.sigmoid, self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.comm.all_reduce(y)


class Qwen3_5DecoderLayer(nn.Module):
    """``linear_attn`` or ``self_attn`` as the layer's type says, then the MLP or MoE block
    (its routed experts paged by ``expert_cache`` if given, under ``expert_prefix`` in the
    checkpoint: default ``model.layers.{layer}.mlp.experts.``)."""

    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: RotaryEmbedding,
                 dtype: torch.dtype, layer: int, layer_type: str | None = None,
                 expert_cache: ExpertCache | None = None, expert_prefix: str | None = None) -> None:
        super().__init__()
        self.layer_type = layer_type or cfg.layer_types[layer]
        if self.layer_type == "linear_attention":
            self.linear_attn = Qwen3_5GatedDeltaNet(cfg, comm, dtype, layer)
        else:
            self.self_attn = Qwen3_5Attention(cfg, comm, rotary, dtype)
        self.mlp = (Qwen3_5MoeSparseMoeBlock(cfg, comm, dtype, layer, expert_cache, expert_prefix)
                    if cfg.n_routed_experts else LlamaMLP(cfg, comm, dtype))
        self.input_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    @property
    def cache_kind(self) -> CacheKind:
        mixer = self.linear_attn if self.layer_type == "linear_attention" else self.self_attn
        return mixer.cache_kind

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cache: LayerKV | LayerState,
                meta: AttentionMetadata) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, cache, meta)
        else:
            h = self.self_attn(positions, h, cache, meta)
        x, h = self.post_attention_layernorm.add_forward(x, h)  # x + h and its norm
        return x + self.mlp(h)


def rotary_for(cfg: ModelConfig, max_positions: int, dtype: torch.dtype) -> RotaryEmbedding:
    """Rotary over the rotated part of a head (``rotary_dim`` of ``head_dim``)."""
    return RotaryEmbedding(cfg.rotary_dim, max_positions, cfg.rope_theta, cfg.rope_scaling_dict, dtype)


class Qwen3_5Model(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, max_positions: int,
                 expert_cache: ExpertCache | None = None) -> None:
        super().__init__()
        rotary = rotary_for(cfg, max_positions, dtype)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, comm, dtype)
        self.layers = nn.ModuleList(Qwen3_5DecoderLayer(cfg, comm, rotary, dtype, i, expert_cache=expert_cache)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, caches: list[LayerKV | LayerState],
                meta: AttentionMetadata, return_prenorm: bool = False):
        x = self.embed_tokens(ids)  # [T, hidden]
        for layer, cache in zip(self.layers, caches):
            x = layer(positions, x, cache, meta)
        return (self.norm(x), x) if return_prenorm else self.norm(x)


PACKED_MODULES = {
    **LlamaForCausalLM.packed_modules,
    "in_proj_qkv": ("in_proj", "qkv"),
    "in_proj_z": ("in_proj", "z"),
    "in_proj_b": ("in_proj", "b"),
    "in_proj_a": ("in_proj", "a"),
}
MULTIMODAL_TEXT = "model.language_model."  # the text model's weights in a multimodal checkpoint
VISION_TOWER = "model.visual."


class Qwen3_5ForCausalLM(LlamaForCausalLM):
    """The Llama wrapper (LM head, tied embeddings, expert skipping) around ``Qwen3_5Model``;
    ``caches[i]`` is a ``LayerKV`` for full-attention layers and a ``LayerState`` for linear
    ones. A multimodal checkpoint's text weights are read from under ``model.language_model``."""

    model_class = Qwen3_5Model
    packed_modules = PACKED_MODULES

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, max_positions: int,
                 expert_cache: ExpertCache | None = None) -> None:
        super().__init__(cfg, comm, dtype, max_positions, expert_cache)
        self.multimodal = cfg.multimodal
        if cfg.multimodal:
            log.info("%s: serving the text model; the vision tower (%s*) is not loaded",
                     cfg.architecture, VISION_TOWER)

    def checkpoint_name(self, name: str) -> str | None:
        """Our name for a checkpoint tensor (None: the vision tower, not used here)."""
        if not self.multimodal:
            return name
        if name.startswith(VISION_TOWER):
            return None
        return "model." + name[len(MULTIMODAL_TEXT):] if name.startswith(MULTIMODAL_TEXT) else name
