"""Vocabulary-parallel embedding and LM head: rank r owns a contiguous range of token rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import split_range, split_sizes
from dist_engine.kernels import qlinear
from dist_engine.layers.linear import note_checkpoint_dtype, project
from dist_engine.layers.loading import copy_checked
from dist_engine.quant import linear as quant_linear
from dist_engine.quant.lazy import QuantTensor


def load_vocab_rows(module: nn.Module, full) -> None:
    """This rank's vocabulary rows of a ``[vocab, hidden]`` table, float or kept quantized."""
    rows = full[module.vocab_start:module.vocab_start + module.local_vocab]
    if isinstance(full, QuantTensor):
        if rows.shape != tuple(module.weight.shape):
            raise ValueError(f"expected a slice of shape {tuple(module.weight.shape)}, got {rows.shape}")
        return quant_linear.take(module, rows, 0)
    note_checkpoint_dtype(module, full)
    copy_checked(module.weight.data, rows)


class VocabParallelEmbedding(nn.Module):
    """Lookup over a row-split table ``[vocab, hidden]``.

    Each rank looks up the ids in its range, writes zeros for the others, and one all-reduce
    sums the pieces (exactly one rank contributes each row). A table kept quantized (GGUF) is
    looked up by dequantizing just the rows asked for.
    """

    def __init__(self, vocab_size: int, hidden: int, comm: Communicator, dtype: torch.dtype) -> None:
        super().__init__()
        self.comm = comm
        self.vocab_start, self.local_vocab = split_range(vocab_size, comm.world_size, comm.rank)
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden, dtype=dtype), requires_grad=False)
        self.weight_packed: qlinear.QWeight | None = None  # only ever a quantized table
        self.keep_dense = True  # a lookup table: never repacked for products

    def load(self, which: str, full, shard_id: object = None) -> None:
        load_vocab_rows(self, full)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        qw = self.weight_packed
        if qw is None:
            return F.embedding(ids, self.weight)
        if ids.device.type == "cpu" and qlinear.available():
            return qlinear.dequantize_rows(qw, ids).to(self.weight.dtype)
        return qlinear.gather_rows(qw, ids).to(self.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.comm.world_size == 1:
            return self._lookup(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = self._lookup(local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.comm.all_reduce(out)


class ParallelLMHead(nn.Module):
    """Logits over the full vocabulary from a row-split ``[vocab, hidden]`` head.

    Each rank computes logits for its rows; one all-gather concatenates them so every rank
    holds the full fp32 logits and samples identically. With tied embeddings the weight is the
    embedding's (same split).
    """

    quant_min_bits = 8  # --quantization int4 keeps the head at int8 (quant/linear.py)

    def __init__(self, vocab_size: int, hidden: int, comm: Communicator, dtype: torch.dtype,
                 tied: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        self.comm = comm
        self.sizes = split_sizes(vocab_size, comm.world_size)
        self.vocab_start, self.local_vocab = split_range(vocab_size, comm.world_size, comm.rank)
        # the embedding whose table this head reads (not a submodule: it is the model's)
        object.__setattr__(self, "tied", tied)
        if tied is not None:
            self.weight = tied.weight
        else:
            self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden, dtype=dtype), requires_grad=False)
        self.weight_packed: torch.Tensor | None = None

    def load(self, which: str, full, shard_id: object = None) -> None:
        load_vocab_rows(self, full)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        logits = project(self, hidden).float()
        return self.comm.all_gather(logits, self.sizes)
