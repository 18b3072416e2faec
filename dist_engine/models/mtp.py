"""DeepSeek-V3-style multi-token-prediction (MTP) layer around the model's own decoder block
(a Llama-family block, or DeepSeek-V3's MLA + MoE block).

One MTP step at position p reads the main model's hidden state of p and the embedding of token
p + 1, and its output predicts token p + 2::

    x = eh_proj(concat(enorm(embed(t[p+1])), hnorm(h[p])))   # order per model
    g = decoder_block(x)                                       # its own paged KV
    logits = lm_head(shared_head.norm(g))                      # head shared with the main model

Module names follow the checkpoints that ship MTP weights (DeepSeek-V3, GLM-4.5):
``model.layers.{num_hidden_layers}.{enorm,hnorm,eh_proj,shared_head.norm,self_attn,mlp,...}``.
DeepSeek-V4 ships ``mtp.{i}.*`` with two input projections summed and hyper-connection streams
(``models/deepseek_v4_mtp.py``). Qwen3.5 names the same parts ``mtp.{pre_fc_norm_embedding,
pre_fc_norm_hidden, fc, layers.0, norm}`` (its norms scale by ``1 + w``, ``layers.0`` is a gated full-attention layer with the
model's MLP or MoE); ``Qwen3_5MTP`` exposes ``norm`` as ``shared_head.norm`` too, so the
speculative decoder drives both alike. The embedding and head are the main model's; their
copies in a checkpoint are ignored. No collectives here: the block's parallel layers hold them,
``eh_proj`` / ``fc`` are replicated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dist_engine.config import ModelConfig
from dist_engine.distributed.comm import Communicator
from dist_engine.layers.attention import AttentionMetadata
from dist_engine.layers.linear import ColumnParallelLinear
from dist_engine.layers.moe import SparseMoE
from dist_engine.layers.norm import OffsetRMSNorm, RMSNorm
from dist_engine.layers.rotary import RotaryEmbedding
from dist_engine.models.deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3ForCausalLM
from dist_engine.models.llama import KVCache, LlamaDecoderLayer, LlamaForCausalLM
from dist_engine.models.qwen3_5 import PACKED_MODULES, Qwen3_5DecoderLayer, rotary_for

if TYPE_CHECKING:
    from dist_engine.experts.cache import ExpertCache


class SharedHead(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps, dtype)


def _add_mtp_inputs(layer: nn.Module, cfg: ModelConfig, dtype: torch.dtype, emb_first: bool) -> None:
    H = cfg.hidden_size
    layer.enorm = RMSNorm(H, cfg.rms_norm_eps, dtype)
    layer.hnorm = RMSNorm(H, cfg.rms_norm_eps, dtype)
    layer.eh_proj = ColumnParallelLinear(2 * H, {None: (0, H, 0)}, False, dtype)  # replicated
    layer.shared_head = SharedHead(H, cfg.rms_norm_eps, dtype)
    layer.emb_first = emb_first


def _mtp_input(layer: nn.Module, emb: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """emb ``[T, H]`` of tokens p + 1, hidden ``[T, H]`` of positions p -> the block's input."""
    e, h = layer.enorm(emb), layer.hnorm(hidden)
    return layer.eh_proj(torch.cat([e, h] if layer.emb_first else [h, e], dim=-1))  # [T, H]


class LlamaMTPLayer(LlamaDecoderLayer):
    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: RotaryEmbedding,
                 dtype: torch.dtype, emb_first: bool, expert_cache: ExpertCache | None = None) -> None:
        super().__init__(cfg, comm, rotary, dtype, cfg.num_hidden_layers, expert_cache)  # its checkpoint index
        _add_mtp_inputs(self, cfg, dtype, emb_first)
        # CPU: the block in one C call (kernels/decoder.py; same bits), set once weights are packed
        self.cpu_decoder = None

    def forward(self, positions: torch.Tensor, emb: torch.Tensor, hidden: torch.Tensor,
                kv: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        x = _mtp_input(self, emb, hidden)  # [T, H]
        if self.cpu_decoder is not None and self.cpu_decoder.forward(x, positions, (kv,), meta) is not None:
            return x  # raw [T, H], updated in place
        return super().forward(positions, x, kv, meta)  # raw [T, H]


class DeepseekV3MTPLayer(DeepseekV3DecoderLayer):
    """DeepSeek-V3's MTP block: MLA and (past first_k_dense_replace) MoE, as in its checkpoints."""

    def __init__(self, cfg: ModelConfig, comm: Communicator, rotary: RotaryEmbedding,
                 dtype: torch.dtype, emb_first: bool, expert_cache: ExpertCache | None = None) -> None:
        super().__init__(cfg, comm, rotary, dtype, cfg.num_hidden_layers, expert_cache)
        _add_mtp_inputs(self, cfg, dtype, emb_first)

    def forward(self, positions: torch.Tensor, emb: torch.Tensor, hidden: torch.Tensor,
                kv: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        return super().forward(positions, _mtp_input(self, emb, hidden), kv, meta)  # raw [T, H]


class Qwen3_5MTP(nn.Module):
    """Qwen3.5's MTP module under its checkpoint names (``mtp.*``): ``fc`` maps
    ``[pre_fc_norm_embedding(embed(t[p+1])), pre_fc_norm_hidden(h[p])]`` (embedding first) to
    the input of ``layers.0``; ``norm`` is the final norm before the shared head."""

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, max_positions: int,
                 emb_first: bool, expert_cache: ExpertCache | None = None) -> None:
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_fc_norm_embedding = OffsetRMSNorm(H, eps, dtype)
        self.pre_fc_norm_hidden = OffsetRMSNorm(H, eps, dtype)
        self.fc = ColumnParallelLinear(2 * H, {None: (0, H, 0)}, False, dtype)  # replicated
        self.layers = nn.ModuleList([Qwen3_5DecoderLayer(
            cfg, comm, rotary_for(cfg, max_positions, dtype), dtype, cfg.num_hidden_layers, "full_attention",
            expert_cache, "mtp.layers.0.mlp.experts.")])
        self.norm = OffsetRMSNorm(H, eps, dtype)
        # the speculative decoder's name for the final norm (the same module: loaded once, as norm)
        self.shared_head = nn.Module()
        self.shared_head.norm = self.norm
        self.emb_first = emb_first

    @property
    def cache_kind(self):
        return self.layers[0].cache_kind

    def forward(self, positions: torch.Tensor, emb: torch.Tensor, hidden: torch.Tensor,
                kv: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        e, h = self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(hidden)  # [T, H] each
        x = self.fc(torch.cat([e, h] if self.emb_first else [h, e], dim=-1))  # [T, H]
        return self.layers[0](positions, x, kv, meta)  # raw [T, H]


class MTPModel(nn.Module):
    """Holds MTP layer 0 under its checkpoint name: ``model.layers.{num_hidden_layers}``, or
    Qwen3.5's ``mtp`` module (chained steps reuse layer 0, as engines do for DeepSeek-V3; a
    Qwen3.5 checkpoint's further ``mtp.layers.{j}`` are not read)."""

    ignored_suffixes = ("embed_tokens.weight", "shared_head.head.weight", "rotary_emb.inv_freq")

    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, max_positions: int,
                 emb_first: bool, expert_cache: ExpertCache | None = None) -> None:
        super().__init__()
        if cfg.is_v4:
            from dist_engine.models.deepseek_v4 import DeepseekV4ForCausalLM
            from dist_engine.models.deepseek_v4_mtp import DeepseekV4MTPLayer, mtp_checkpoint_name

            self.packed_modules = DeepseekV4ForCausalLM.packed_modules
            self.checkpoint_name = mtp_checkpoint_name
            self.mtp = nn.ModuleList([DeepseekV4MTPLayer(cfg, comm, dtype, max_positions, expert_cache)])
            self._prefix = self._block = "mtp.0."
            return
        if cfg.is_hybrid:
            self.packed_modules = PACKED_MODULES
            self.mtp = Qwen3_5MTP(cfg, comm, dtype, max_positions, emb_first, expert_cache)
            self._prefix, self._block = "mtp.", "mtp.layers.0."
            return
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                 cfg.rope_scaling_dict, dtype)
        main, block = ((DeepseekV3ForCausalLM, DeepseekV3MTPLayer) if cfg.is_mla
                       else (LlamaForCausalLM, LlamaMTPLayer))
        self.packed_modules = main.packed_modules
        self.layer_index = cfg.num_hidden_layers
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(self.layer_index): block(cfg, comm, rotary, dtype, emb_first,
                                                                       expert_cache)})
        self._prefix = self._block = f"model.layers.{self.layer_index}."

    def skip_tensor(self, name: str) -> bool:
        """A routed expert of an MoE MTP block that another rank or the expert cache reads, or a
        Qwen3.5 MTP layer past 0."""
        if name.startswith("mtp.layers.") and not name.startswith(self._block):
            return True
        block = self.layer.layers[0] if hasattr(self.layer, "layers") else self.layer
        head, mlp = f"{self._block}mlp.experts.", block.mlp
        return name.startswith(head) and isinstance(mlp, SparseMoE) and mlp.skips_tensor(name[len(head):])

    @property
    def layer(self) -> nn.Module:
        """MTP layer 0 (``LlamaMTPLayer``, ``DeepseekV3MTPLayer``, ``DeepseekV4MTPLayer`` or ``Qwen3_5MTP``)."""
        if hasattr(self, "mtp"):
            return self.mtp[0] if isinstance(self.mtp, nn.ModuleList) else self.mtp
        return self.model.layers[str(self.layer_index)]

    def prefix(self) -> str:
        return self._prefix
