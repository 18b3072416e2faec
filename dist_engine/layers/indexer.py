"""DeepSeek-V4's lightning indexer: which compressed rows each query of a compressed sparse
attention layer reads.

The indexer compresses the tokens with its own overlapping compressor (keys of
``index_head_dim``, kept as another ratio-m kind) and scores row ``s`` for query ``t`` as
``sum_h w[t, h] relu(q[t, h] . k[s]) / sqrt(d)`` with ``w = weights_proj(x) / sqrt(heads)``
(fp32); a query keeps the ``index_topk`` best rows it may read (rows whose window is complete).

Sequence shards hold disjoint rows, so each rank ranks its own rows, and the candidates of all
shards are merged: the top-k of a union is the top-k of the per-shard top-ks. Ties are broken by
the lower row index everywhere (a stable sort of candidates listed by row), so the selection is
the one a single rank would make and every rank makes the same one. Its weights are replicated
(every rank of a TP group scores every query alike).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_engine.layers.compressed_rows import CompressedRows
from dist_engine.layers.compressor import Compressor, replicated
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.rotary import TrailingRotary


def ranked(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of ``scores`` ``[N, C]`` (row ids ``ids``, -1 for none): by score, then by
    lower id; ``(scores, ids)`` ``[N, k]``."""
    by_id = torch.sort(torch.where(ids < 0, torch.iinfo(ids.dtype).max, ids), dim=-1, stable=True).indices
    scores, ids = scores.gather(-1, by_id), ids.gather(-1, by_id)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return scores.gather(-1, order), ids.gather(-1, order)


class Indexer(Compressor):
    """The compressor's parameters plus ``q_b_proj`` ``[heads * D, q_lora_rank]`` and
    ``scorer.weights_proj`` ``[heads, hidden]`` (transformers' names)."""

    def __init__(self, hidden: int, q_lora_rank: int, num_heads: int, head_dim: int, topk: int, ratio: int,
                 rotary: TrailingRotary, norm_eps: float, dtype: torch.dtype,
                 quant: tuple[int, int] | None) -> None:
        super().__init__(hidden, head_dim, ratio, True, rotary, norm_eps, dtype)
        self.num_heads, self.topk = num_heads, topk
        self.q_b_proj = replicated(q_lora_rank, num_heads * head_dim, dtype, quant)
        self.scorer = nn.Module()
        self.scorer.weights_proj = replicated(hidden, num_heads, dtype)

    def select(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, keys: LayerKV,
               rows: CompressedRows, spans: list[tuple[int, int]], comm) -> torch.Tensor:
        """The rows ``[T, index_topk]`` each query reads (row ids, -1: none) from x ``[T, hidden]``
        and the query LoRA ``qr`` ``[T, q_lora_rank]``; ``spans``: each sequence's (first token,
        count) in step order; ``comm``: the sequence-shard group (None: one shard)."""
        T, d, k = x.shape[0], self.head_dim, self.topk
        q = self.rotary(positions, self.q_b_proj(qr).view(T, self.num_heads, d)).float()
        w = self.scorer.weights_proj(x).float() * self.num_heads ** -0.5  # [T, heads]
        best = torch.full((T, k), float("-inf"), device=x.device)
        ids = torch.full((T, k), -1, dtype=torch.long, device=x.device)
        limit = rows.query_limit(positions)
        for b, (first, n) in enumerate(spans):
            R = rows.count[b]
            local = rows.local[b, :R]
            if not n or not bool(local.any()):
                continue
            kb = keys.gather(rows.slots[b, :R], torch.float32)[0].view(R, d)  # [R, d]
            s = torch.relu(torch.matmul(q[first:first + n], kb.T)) * d ** -0.5  # [n, heads, R]
            s = (s * w[first:first + n].unsqueeze(-1)).sum(dim=1)  # [n, R]
            r = torch.arange(R, device=x.device)
            s = s.masked_fill(~((r < limit[first:first + n, None]) & local), float("-inf"))
            top = min(k, R)
            v, i = ranked(s, r.expand(n, R), top)
            best[first:first + n, :top], ids[first:first + n, :top] = v, i
        if comm is not None:  # the candidates of every shard, merged alike on every rank
            best, ids = ranked(torch.cat(comm.gather_all(best), dim=1), torch.cat(comm.gather_all(ids), dim=1), k)
        return torch.where(best > float("-inf"), ids, -1)
