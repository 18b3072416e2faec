"""DeepSeek-V4's multi-token-prediction layer (``mtp.{i}.*`` in its checkpoints).

Its input mixes the main model's residual streams before ``hc_head`` (``[T, hc_mult, hidden]``,
what the model returns as its pre-norm hidden states) with the embedding of the next token, by
two projections summed, the embedding's broadcast over the streams::

    x = h_proj(hnorm(h[p])) + e_proj(enorm(embed(t[p + 1])))      # [T, hc_mult, hidden]
    g = V4 block(x)       # hyper-connections, window-only attention, routed MoE (no hash)
    logits = lm_head(norm(hc_head(g)))                              # its own collapse and norm

The block's output streams (flattened, ``[T, hc_mult * hidden]``) feed the next chained step,
so speculation runs with ``hidden_stage`` and ``feedback`` both "raw". ``shared_head.norm`` is
the speculative decoder's name for what turns them into the shared head's input.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dist_engine.config import ModelConfig
from dist_engine.config.deepseek_v4 import SLIDING
from dist_engine.distributed.comm import Communicator
from dist_engine.layers.attention import AttentionMetadata
from dist_engine.layers.compressor import replicated
from dist_engine.layers.hyper_connection import HyperHead
from dist_engine.layers.norm import Fp32RMSNorm
from dist_engine.models.deepseek_v4 import DeepseekV4DecoderLayer, rotaries
from dist_engine.models.deepseek_v4_names import checkpoint_name


class DeepseekV4MTPLayer(DeepseekV4DecoderLayer):
    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, max_positions: int,
                 expert_cache=None) -> None:
        super().__init__(cfg, comm, rotaries(cfg, max_positions, dtype), dtype, SLIDING, 0, False,
                         cfg.num_hidden_layers, expert_cache, "mtp.0.mlp.experts.")
        H, eps, v4 = cfg.hidden_size, cfg.rms_norm_eps, cfg.v4
        self.hidden, self.hc_mult = H, v4.hc_mult
        self.enorm = Fp32RMSNorm(H, eps)
        self.hnorm = Fp32RMSNorm(H, eps)
        self.e_proj = replicated(H, H, dtype, cfg.fp8_block)
        self.h_proj = replicated(H, H, dtype, cfg.fp8_block)
        self.hc_head = HyperHead(H, v4.hc_mult, v4.hc_eps, eps)
        self.norm = Fp32RMSNorm(H, eps)
        self.shared_head = SimpleNamespace(norm=self.head_input)

    def head_input(self, g: torch.Tensor) -> torch.Tensor:
        """Block output streams ``[N, hc_mult * hidden]`` -> the shared head's input ``[N, hidden]``."""
        return self.norm(self.hc_head(g.view(g.shape[0], self.hc_mult, self.hidden)))

    def forward(self, positions: torch.Tensor, emb: torch.Tensor, hidden: torch.Tensor, kv,
                meta: AttentionMetadata) -> torch.Tensor:
        """emb ``[T, hidden]`` of tokens p + 1, hidden ``[T, hc_mult * hidden]`` (streams of p)
        -> this layer's output streams ``[T, hc_mult * hidden]``."""
        T, n, H = emb.shape[0], self.hc_mult, self.hidden
        e = self.e_proj(self.enorm(emb))  # [T, H]
        h = self.h_proj(self.hnorm(hidden.reshape(T * n, H))).view(T, n, H)
        return super().forward(positions, h + e.unsqueeze(1), kv, meta, None).flatten(1)


def mtp_checkpoint_name(stored: str) -> str | None:
    """MTP layer 0's tensors under our names (chained steps reuse it; later layers are not read)."""
    if not stored.startswith("mtp.0."):
        return None
    return checkpoint_name(stored)
