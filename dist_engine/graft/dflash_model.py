"""A DFlash drafter in trainable form (plain torch, whole sequences, many blocks at once),
initialised from the base model and written in the published ``DFlashDraftModel`` format that
``--speculative dflash`` loads (``models/dflash.py``: the same formula and parameters).

Training forward for a batch of sequences: the context ``c = hidden_norm(fc(features))`` of
every position, and per sequence ``n`` blocks ``[x[a], mask, ..., mask]`` at positions
``a .. a + B - 1`` for anchors ``a``. A block's rows attend the context keys at positions
``< a`` and the whole block (no causal mask), exactly what the engine's proposal after the
verified prefix ``x[:a]`` sees.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from dist_engine.config import ModelConfig
from dist_engine.config.dflash import ARCHITECTURE
from dist_engine.layers.rotary import RotaryEmbedding
from dist_engine.worker.spec_decode import DRAFT_VOCAB_TENSOR

DFLASH_WEIGHTS = "model.safetensors"


def default_target_layers(num_layers: int, count: int) -> list[int]:
    """``count`` target layers spread from layer 1 to ``num_layers - 3`` (the published
    drafters' rule; the middle layer when ``count`` is 1)."""
    if count == 1:
        return [num_layers // 2]
    end = max(1, num_layers - 3)
    return sorted({round(1 + i * (end - 1) / (count - 1)) for i in range(count)})


class DFlashLayer(nn.Module):
    """Modules named as in the checkpoint (``self_attn.*``, ``mlp.*``, the two norms)."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        H, D, b, eps = cfg.hidden_size, cfg.head_dim, cfg.attention_bias, cfg.rms_norm_eps
        self.nq, self.nk, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, D
        a = self.self_attn = nn.Module()
        a.q_proj, a.k_proj = nn.Linear(H, self.nq * D, bias=b), nn.Linear(H, self.nk * D, bias=b)
        a.v_proj, a.o_proj = nn.Linear(H, self.nk * D, bias=b), nn.Linear(self.nq * D, H, bias=False)
        a.q_norm, a.k_norm = nn.RMSNorm(D, eps=eps), nn.RMSNorm(D, eps=eps)
        m = self.mlp = nn.Module()
        m.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        m.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        m.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.rotary = rotary

    def _kv(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[N, Hk, T, D]`` of states ``h`` ``[N, T, H]`` at ``pos`` ``[N, T]``."""
        N, T, _ = h.shape
        a = self.self_attn
        k = a.k_norm(a.k_proj(h).view(N * T, self.nk, self.d))
        k = self.rotary.rotate(pos.reshape(-1), k).view(N, T, self.nk, self.d).transpose(1, 2)
        return k, a.v_proj(h).view(N, T, self.nk, self.d).transpose(1, 2)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, c: torch.Tensor, cpos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Blocks ``x`` ``[N, R, H]`` at ``pos`` ``[N, R]`` over context ``c`` ``[N, L, H]`` at
        ``cpos``; ``mask`` ``[N, R, L + R]`` says which context and block keys each row sees."""
        N, R, _ = x.shape
        a, m = self.self_attn, self.mlp
        h = self.input_layernorm(x)
        q = a.q_norm(a.q_proj(h).view(N * R, self.nq, self.d))
        q = self.rotary.rotate(pos.reshape(-1), q).view(N, R, self.nq, self.d).transpose(1, 2)
        ck, cv = self._kv(c, cpos)
        bk, bv = self._kv(h, pos)
        att = F.scaled_dot_product_attention(q, torch.cat([ck, bk], 2), torch.cat([cv, bv], 2),
                                             attn_mask=mask[:, None], enable_gqa=self.nq != self.nk)
        x = x + a.o_proj(att.transpose(1, 2).reshape(N, R, self.nq * self.d))
        h = self.post_attention_layernorm(x)
        return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


class GraftDFlash(nn.Module):
    def __init__(self, cfg: ModelConfig, num_layers: int, target_layer_ids: list[int], block_size: int,
                 mask_token_id: int, max_positions: int) -> None:
        super().__init__()
        H = cfg.hidden_size
        self.cfg, self.block_size, self.mask_token_id = cfg, block_size, mask_token_id
        self.target_layer_ids = list(target_layer_ids)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions + block_size, cfg.rope_theta, None,
                                      torch.float32)
        self.layers = nn.ModuleList(DFlashLayer(cfg, self.rotary) for _ in range(num_layers))
        self.fc = nn.Linear(len(target_layer_ids) * H, H, bias=False)
        self.hidden_norm = nn.RMSNorm(H, eps=cfg.rms_norm_eps)
        self.norm = nn.RMSNorm(H, eps=cfg.rms_norm_eps)

    @torch.no_grad()
    def init_from_base(self, base: dict[str, torch.Tensor]) -> None:
        """Layers = copies of the base's first ``num_layers`` decoder layers (q/k norms start at
        1): a block's rows start as token embeddings, what those layers were made to read (copies
        of the last layers, fed embeddings, started at a loss of ~20 on the default model and
        drafted slot 1 right 4.1% of the time after 22 steps, against 8.1% for these). ``fc`` passes the shallowest target layer's output through and ``hidden_norm`` is
        the first layer's input norm, so the context enters K/V much as the base's own early
        tokens do; ``norm`` = the base's final norm."""
        for j, layer in enumerate(self.layers):
            pre = f"model.layers.{j}."
            for name, p in layer.named_parameters():
                p.copy_(base[pre + name] if pre + name in base else torch.ones_like(p))  # q/k norms: 1
        H = self.cfg.hidden_size
        first = self.target_layer_ids.index(min(self.target_layer_ids))
        self.fc.weight.zero_()
        self.fc.weight[:, first * H:(first + 1) * H].copy_(torch.eye(H))
        self.hidden_norm.weight.copy_(base["model.layers.0.input_layernorm.weight"])
        self.norm.weight.copy_(base["model.norm.weight"])

    def forward(self, emb: torch.Tensor, pos: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final-norm states ``[N, R, H]`` of the blocks (embedded tokens ``emb`` ``[N, R, H]``
        at ``pos``) over the context features ``feats`` ``[N, L, n * H]`` at positions 0..L-1."""
        N, L, _ = feats.shape
        c = self.hidden_norm(self.fc(feats))  # [N, L, H]
        cpos = torch.arange(L, device=feats.device).expand(N, L)
        x = emb
        for layer in self.layers:
            x = layer(x, pos, c, cpos, mask)
        return self.norm(x)

    def export(self, out_dir: str, dtype: torch.dtype, extra: dict, vocab_ids: torch.Tensor | None = None) -> None:
        """The published format: ``model.safetensors`` and ``config.json`` (``extra``: our keys);
        ``vocab_ids``: the draft vocabulary, kept as the ``draft_vocab`` tensor."""
        tensors = {k: v.detach().to(dtype) for k, v in self.named_parameters()}  # the checkpoint's names
        if vocab_ids is not None:
            tensors[DRAFT_VOCAB_TENSOR] = vocab_ids
        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()},
                  os.path.join(out_dir, DFLASH_WEIGHTS))
        c = self.cfg
        config = {"architectures": [ARCHITECTURE], "model_type": "qwen3", "hidden_size": c.hidden_size,
                  "intermediate_size": c.intermediate_size, "num_hidden_layers": len(self.layers),
                  "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                  "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
                  "attention_bias": c.attention_bias, "vocab_size": c.vocab_size,
                  "block_size": self.block_size, "torch_dtype": str(dtype).removeprefix("torch."),
                  "dflash_config": {"target_layer_ids": self.target_layer_ids,
                                    "mask_token_id": self.mask_token_id},
                  **extra}
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start from a drafter written by :meth:`export` (same base and shape)."""
        own = dict(self.named_parameters())
        for name, t in tensors.items():
            if name == DRAFT_VOCAB_TENSOR:
                continue
            if name not in own or own[name].shape != t.shape:
                raise ValueError(f"the drafter to start from has {name} {tuple(t.shape)}, which this "
                                 "drafter (its base, layer count and target layers) does not")
            own[name].copy_(t.float())
