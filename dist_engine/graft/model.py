"""The MTP layer in trainable form (plain torch modules, causal attention over whole sequences),
initialised from the base model and exported under DeepSeek-V3's checkpoint names.

Its forward is the engine's MTP step (``dist_engine.models.mtp``) written for training: the same
formula and parameters, full sequences instead of paged K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.config import ModelConfig
from dist_engine.layers.rotary import RotaryEmbedding


class GraftMTP(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.nq, self.nk, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, D
        eps = cfg.rms_norm_eps
        self.enorm, self.hnorm = nn.RMSNorm(H, eps=eps), nn.RMSNorm(H, eps=eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        b = cfg.attention_bias
        self.q_proj = nn.Linear(H, self.nq * D, bias=b)
        self.k_proj = nn.Linear(H, self.nk * D, bias=b)
        self.v_proj = nn.Linear(H, self.nk * D, bias=b)
        self.o_proj = nn.Linear(self.nq * D, H, bias=False)
        inter = cfg.intermediate_size
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)
        self.shared_head_norm = nn.RMSNorm(H, eps=eps)
        self.rotary = RotaryEmbedding(D, max_positions, cfg.rope_theta, cfg.rope_scaling_dict,
                                      torch.float32)

    @torch.no_grad()
    def init_from_base(self, base_state: dict[str, torch.Tensor]) -> None:
        """Block = a copy of the base's last decoder layer; ``eh_proj`` = [0 | I] (passes the
        hidden state through); hnorm and shared_head.norm = the base's final norm."""
        last = f"model.layers.{self.cfg.num_hidden_layers - 1}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(self, name).weight.copy_(base_state[last + f"self_attn.{name}.weight"])
            if getattr(self, name).bias is not None:
                getattr(self, name).bias.copy_(base_state[last + f"self_attn.{name}.bias"])
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self, name).weight.copy_(base_state[last + f"mlp.{name}.weight"])
        for name in ("input_layernorm", "post_attention_layernorm"):
            getattr(self, name).weight.copy_(base_state[last + f"{name}.weight"])
        H = self.cfg.hidden_size
        self.eh_proj.weight.zero_()
        self.eh_proj.weight[:, H:].copy_(torch.eye(H))
        self.enorm.weight.fill_(1.0)
        self.hnorm.weight.copy_(base_state["model.norm.weight"])
        self.shared_head_norm.weight.copy_(base_state["model.norm.weight"])

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                context: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """emb, hidden ``[B, L, H]`` (tokens p + 1, hidden states of p); positions ``[B, L]``.

        Returns the raw block output ``[B, L, H]`` and this step's keys/values. Without
        ``context`` attention is causal over this step's own keys (the first MTP step, whose
        keys are what the engine's cache holds for verified positions). A chained step passes
        ``context``: the keys/values of step 1 and of the chain's earlier steps; element t then
        attends step 1's keys up to t (the verified prefix) and element t of each earlier step
        plus its own (the chain), exactly what it sees in the engine's cache when drafting.
        """
        B, L, H = emb.shape
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B * L, self.nq, self.d)
        k = self.k_proj(h).view(B * L, self.nk, self.d)
        v = self.v_proj(h).view(B, L, self.nk, self.d).transpose(1, 2)
        q, k = self.rotary(positions.reshape(-1), q, k)
        q = q.view(B, L, self.nq, self.d).transpose(1, 2)  # [B, Hq, L, D]
        k = k.view(B, L, self.nk, self.d).transpose(1, 2)  # [B, Hk, L, D]
        gqa = self.nq != self.nk
        if not context:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            (k1, v1), chain = context[0], context[1:]
            ks = [k1[:, :, :L]] + [c[0][:, :, :L] for c in chain] + [k]
            vs = [v1[:, :, :L]] + [c[1][:, :, :L] for c in chain] + [v]
            t = torch.arange(L)
            causal = t.view(L, 1) >= t.view(1, L)  # step 1: the verified prefix
            own = t.view(L, 1) == t.view(1, L)  # chain steps: the same element only
            mask = torch.cat([causal] + [own] * (len(ks) - 1), dim=1)  # [L, n_steps * L]
            att = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2),
                                                 attn_mask=mask, enable_gqa=gqa)
        x = x + self.o_proj(att.transpose(1, 2).reshape(B, L, self.nq * self.d))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), (k, v)

    def _export_names(self) -> dict[str, str]:
        """Our module name -> its DeepSeek-V3 name under ``model.layers.{num_hidden_layers}.``."""
        return {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj",
                "shared_head_norm": "shared_head.norm", "input_layernorm": "input_layernorm",
                "post_attention_layernorm": "post_attention_layernorm",
                **{n: f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{n: f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}}

    def export(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors under the engine's (DeepSeek-V3) names, ``model.layers.{num_hidden_layers}.*``."""
        pre = f"model.layers.{self.cfg.num_hidden_layers}."
        out = {}
        for ours, theirs in self._export_names().items():
            mod = getattr(self, ours)
            out[f"{pre}{theirs}.weight"] = mod.weight.detach().to(dtype).contiguous()
            if getattr(mod, "bias", None) is not None:
                out[f"{pre}{theirs}.bias"] = mod.bias.detach().to(dtype).contiguous()
        return out

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of :meth:`export`: start from a graft written earlier (same base shapes)."""
        pre = f"model.layers.{self.cfg.num_hidden_layers}."
        for ours, theirs in self._export_names().items():
            mod = getattr(self, ours)
            for attr in ("weight", "bias"):
                param = getattr(mod, attr, None)
                if param is None:
                    continue
                t = tensors.get(f"{pre}{theirs}.{attr}")
                if t is None or t.shape != param.shape:
                    raise ValueError(f"the graft to start from has no {pre}{theirs}.{attr} of shape "
                                     f"{tuple(param.shape)}: it was made for another base model")
                param.copy_(t.float())
