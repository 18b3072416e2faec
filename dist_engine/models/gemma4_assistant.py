"""Gemma 4 assistant drafter (transformers' ``Gemma4AssistantForCausalLM``), HF module names.

One draft step for a sequence whose last verified position is ``p - 1`` and whose next token
(at ``p``) is known: ``x = pre_projection(cat[target_embed(token), h])`` with ``h`` the target's
final-norm hidden state of ``p - 1`` (later steps: this drafter's own ``post_projection``
output), the decoder layers at the constant position ``p`` attending the target's cached K/V of
positions ``< p`` (each layer that of the target's last K/V-storing layer of its type; sliding
layers its last ``sliding_window + 1`` keys, as transformers' flipped bidirectional mask
admits), the final norm, then the head: the tied embedding, or the centroid-masked head.
Nothing is written to any cache, so every step of a chain reads the same keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.config.gemma4_assistant import Gemma4AssistantConfig
from dist_engine.distributed.comm import Communicator
from dist_engine.layers.attention import AttentionMetadata
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.loading import copy_checked
from dist_engine.models.gemma4 import Gemma4TextDecoderLayer, rotary_by_layer_type
from dist_engine.models.gemma4_parts import Gemma4RMSNorm, replicated


class Gemma4AssistantHead(nn.Module):
    """The drafter's output embedding ``[vocab, hidden]``, whole on every rank (the drafter's
    hidden size is small; the masked head gathers arbitrary rows of it)."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden, dtype=dtype), requires_grad=False)

    def load(self, which: str, full, shard_id: object = None) -> None:
        copy_checked(self.weight.data, full[:])


class Gemma4AssistantMaskedEmbedder(nn.Module):
    """Scores only the tokens of the best ``top_k`` clusters (``centroids`` scores clusters; a
    cluster's tokens are its row of ``token_ordering`` viewed ``[clusters, vocab / clusters]``);
    every other token gets the row's lowest score minus one (transformers takes the minimum
    over its batch, which is this row's at batch 1)."""

    def __init__(self, acfg: Gemma4AssistantConfig, dtype: torch.dtype) -> None:
        super().__init__()
        t = acfg.text
        self.top_k, self.num_centroids = acfg.centroid_intermediate_top_k, acfg.num_centroids
        self.centroids = replicated(t.hidden_size, acfg.num_centroids, dtype)
        self.token_ordering = nn.Parameter(torch.zeros(t.vocab_size, dtype=torch.long), requires_grad=False)

    def load(self, which: str, full, shard_id: object = None) -> None:
        copy_checked(self.token_ordering.data, full[:].long())

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # h [N, hidden]; weight [vocab, hidden] -> logits [N, vocab]
        N, V = h.shape[0], weight.shape[0]
        clusters = self.centroids(h).topk(self.top_k, dim=-1).indices  # [N, k]
        ids = self.token_ordering.view(self.num_centroids, -1)[clusters].reshape(N, -1)  # [N, k * V/C]
        scores = (weight[ids] @ h.unsqueeze(-1)).squeeze(-1)  # [N, k * V/C]
        floor = scores.min(dim=-1, keepdim=True).values - 1.0
        return floor.expand(N, V).clone().scatter_(1, ids, scores)


class Gemma4AssistantModel(nn.Module):
    def __init__(self, acfg: Gemma4AssistantConfig, sources: dict[str, int], comm: Communicator,
                 dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        cfg = acfg.text
        rotary = rotary_by_layer_type(cfg, dtype, max_positions)
        self.layers = nn.ModuleList(
            Gemma4TextDecoderLayer(cfg, comm, rotary[t], dtype, i, reads=sources[t])
            for i, t in enumerate(cfg.layer_types))
        self.norm = Gemma4RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class Gemma4AssistantForCausalLM(nn.Module):
    packed_modules = {"q_proj": ("qkv_proj", "q"), "gate_proj": ("gate_up_proj", 0),
                      "up_proj": ("gate_up_proj", 1)}

    def __init__(self, acfg: Gemma4AssistantConfig, sources: dict[str, int], comm: Communicator,
                 dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        t = acfg.text
        self.layer_types = t.layer_types
        self.model = Gemma4AssistantModel(acfg, sources, comm, dtype, max_positions)
        self.pre_projection = replicated(2 * acfg.backbone_hidden_size, t.hidden_size, dtype)
        self.post_projection = replicated(t.hidden_size, acfg.backbone_hidden_size, dtype)
        self.lm_head = Gemma4AssistantHead(t.vocab_size, t.hidden_size, dtype)
        self.tied_head = t.tie_word_embeddings
        self.masked_embedding = Gemma4AssistantMaskedEmbedder(acfg, dtype) if acfg.use_ordered_embeddings else None

    def checkpoint_name(self, name: str) -> str | None:
        """The input embedding is only ever the (tied) head; a stored head of a tied drafter is
        the same tensor again."""
        if name == "model.embed_tokens.weight":
            return "lm_head.weight" if self.tied_head else None
        if name == "lm_head.weight" and self.tied_head:
            return None
        return name

    def forward(self, positions: torch.Tensor, emb: torch.Tensor, hidden: torch.Tensor,
                caches: dict[str, LayerKV], meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """emb: the target's scaled embedding of the token at ``positions`` ``[N, Hb]``; hidden:
        the state before it ``[N, Hb]`` -> (the next step's state ``[N, Hb]``, logits ``[N,
        vocab]`` fp32). ``caches``: the target's K/V per layer type."""
        x = self.pre_projection(torch.cat([emb, hidden], dim=-1))  # [N, hidden]
        for layer, kind in zip(self.model.layers, self.layer_types):
            x = layer(positions, x, caches[kind], meta)
        x = self.model.norm(x)
        if self.masked_embedding is not None:
            logits = self.masked_embedding(x, self.lm_head.weight)
        else:
            logits = F.linear(x, self.lm_head.weight)
        return self.post_projection(x), logits.float()
