"""Tensor-parallel linear layers.

Each layer holds only its rank's slice of the weight and knows how to cut that slice out of a
full checkpoint tensor (``load``). Full sizes are named ``*_features``; per-rank sizes ``local_*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import split_range
from dist_engine.kernels import linear as cpu_linear
from dist_engine.kernels.qlinear import QWeight
from dist_engine.layers.fp8 import (
    FP8,
    CheckpointFormatError,
    dequantized,
    load_scale_rows,
    make_fp8,
)
from dist_engine.layers.loading import copy_checked
from dist_engine.quant import linear as quant_linear
from dist_engine.quant.groups import GroupQuant
from dist_engine.quant.lazy import QuantTensor

# shard id -> (start row in the checkpoint tensor, number of rows, first row in the local weight)
ShardMap = dict[object, tuple[int, int, int]]

# CPU products run through ``kernels/linear.c`` from a weight repacked once into 16-row panels
# (fp32 and bf16). Measured on 2 AVX2 cores over all 121 products of the default model
# (docs/performance.md): 1 row ~2x faster than oneDNN's packed fp32 product, 16-64 rows
# 1.3-1.5x, 256 rows on par; bf16 1.3-1.6x faster than PyTorch at 1 row and 5x at 16 rows. Every
# row's result is independent of the batch. Without a C compiler, fp32 weights are reordered
# into oneDNN's blocked layout (the op PyTorch's own CPU compiler uses) and bf16 stays dense.
# The packed copy replaces the dense weight, so weights are held once; a layer whose weight is
# read directly (MLA's absorbed ``kv_b_proj``) sets ``keep_dense`` and is not packed.
try:
    _ONEDNN_PACK = torch.ops.mkldnn._reorder_linear_weight
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # a torch build without oneDNN: plain F.linear
    _ONEDNN_PACK = _ONEDNN_LINEAR = None
ONEDNN_BATCH_HINT = 128  # the layout oneDNN picks for this many rows served 1-512 rows best here


def _onednn_pack(w: torch.Tensor) -> torch.Tensor | None:
    if (_ONEDNN_PACK is None or w.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()):
        return None
    return _ONEDNN_PACK(w.detach(), ONEDNN_BATCH_HINT)


def pack_weight(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace ``module``'s dense CPU weight by a packed copy (a no-op where none applies).

    The dense parameter becomes empty (same dtype), so a stray direct read fails loudly; a tied
    embedding keeps its own reference to the shared tensor. ``dtype``: panels of another dtype
    than the weight's (bf16 panels of an fp32 weight, read by fp32 activations; by default the
    16-bit dtype the checkpoint stored it in, ``checkpoint_16bit``); only the C kernel does
    that, so where it cannot the weight is packed in its own dtype."""
    w = module.weight
    if (getattr(module, "weight_packed", None) is not None or w.device.type != "cpu"
            or getattr(module, "keep_dense", False)):
        return
    dtype = dtype or checkpoint_16bit(module)
    packed = dtype not in (None, w.dtype) and cpu_linear.pack(w, dtype)
    packed = packed or cpu_linear.pack(w) or _onednn_pack(w)
    if packed is None:
        return
    module.weight_packed = packed
    module.weight = nn.Parameter(w.new_empty(0), requires_grad=False)


def note_checkpoint_dtype(module: nn.Module, full) -> None:
    """Remember the dtype the checkpoint stores ``module``'s weight in (each stacked part's)."""
    module.checkpoint_dtypes = getattr(module, "checkpoint_dtypes", frozenset()) | {getattr(full, "dtype", None)}


def checkpoint_16bit(module: nn.Module) -> torch.dtype | None:
    """bf16 or fp16 where the checkpoint stores all of an fp32 layer's weight in it: its values
    are exact at 2 bytes, so the CPU panels keep them there and fp32 activations read them
    (bitwise the fp32 product, half the bytes: a 16-bit checkpoint or GGUF F16 file served
    with fp32 activations, as llama.cpp serves F16 weights)."""
    source = getattr(module, "tied", None) or module  # a tied head reads the embedding's table
    kinds = getattr(source, "checkpoint_dtypes", frozenset())
    if module.weight.dtype != torch.float32 or len(kinds) != 1:
        return None
    (kind,) = kinds
    return kind if kind in (torch.bfloat16, torch.float16) else None


def pack_weights(root: nn.Module, dtype: torch.dtype | None = None) -> None:
    """``pack_weight`` every layer under ``root`` that projects through ``project``."""
    for module in root.modules():
        if hasattr(module, "weight_packed"):
            pack_weight(module, dtype)


def weight_bytes(root: nn.Module) -> int:
    """Bytes of ``root``'s parameters plus its packed weights."""
    packed = [m.weight_packed for m in root.modules() if getattr(m, "weight_packed", None) is not None]
    return sum(t.nbytes for t in root.parameters()) + sum(p.nbytes for p in packed)


def project(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` for ``x`` ``[T, in]``, through the packed weight where there is one."""
    if module.weight.dtype == FP8:  # block-scaled: dequantize this layer's weight for this call
        return F.linear(x, dequantized(module, x.dtype), bias)
    packed = module.weight_packed
    if packed is None:
        return F.linear(x, module.weight, bias)
    if isinstance(packed, QWeight):  # kept quantized (quant/)
        return quant_linear.apply(module, packed, x, bias)
    if isinstance(packed, cpu_linear.PanelWeight):
        return cpu_linear.linear(x, packed, bias)
    return _ONEDNN_LINEAR(x.contiguous(), packed, bias, "none", [], "")


class ColumnParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with W's output rows split across ranks.

    W is ``[out_features, in_features]``; rank r keeps rows ``[start_r, start_r + local_out)``
    (unequal counts allowed) and the matching bias entries. The output stays sharded along its
    last dim, so no collective runs here. Several checkpoint tensors can be stacked into one
    local weight (q/k/v, gate/up): ``shards`` says where each one's slice goes.
    """

    def __init__(self, in_features: int, shards: ShardMap, bias: bool, dtype: torch.dtype,
                 quant_block: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.shards = shards
        self.local_out = sum(n for _, n, _ in shards.values())
        self.weight = nn.Parameter(torch.empty(self.local_out, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(self.local_out, dtype=dtype), requires_grad=False) if bias else None
        )
        self.weight_packed: torch.Tensor | None = None
        if quant_block is not None:  # FP8 block-scaled weights (layers/fp8.py)
            make_fp8(self, quant_block, 0, in_features)

    @classmethod
    def split(cls, in_features: int, out_features: int, comm: Communicator, bias: bool,
              dtype: torch.dtype) -> ColumnParallelLinear:
        start, n = split_range(out_features, comm.world_size, comm.rank)
        return cls(in_features, {None: (start, n, 0)}, bias, dtype)

    def load(self, which: str, full, shard_id: object = None) -> None:
        """Copy this rank's rows of ``full`` (a tensor or lazy safetensors slice) into place."""
        src, n, dst = self.shards[shard_id]
        if which == "weight_scale_inv":
            return load_scale_rows(self, full, src, n, dst)
        if which == "weight" and isinstance(full, QuantTensor):  # kept quantized: this rank's rows
            return quant_linear.take(self, _rows_of(full, src, n, self.in_features), dst)
        if which == "weight":
            _check_fp8(self.weight, full)
            note_checkpoint_dtype(self, full)
        param = self.weight if which == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a {which} this layer does not use")
        copy_checked(param.data[dst:dst + n], full[src:src + n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, local_out]
        return project(self, x, self.bias)


def merged_column(in_features: int, out_features: list[int], comm: Communicator,
                  dtype: torch.dtype, quant_block: tuple[int, int] | None = None) -> ColumnParallelLinear:
    """Several column-parallel outputs of one input in one matmul (gate_proj + up_proj)."""
    shards: ShardMap = {}
    offset = 0
    for i, full in enumerate(out_features):
        start, n = split_range(full, comm.world_size, comm.rank)
        shards[i] = (start, n, offset)
        offset += n
    return ColumnParallelLinear(in_features, shards, False, dtype, quant_block)


def qkv_column(hidden: int, head_dim: int, q_heads: tuple[int, int], kv_heads: tuple[int, int],
               bias: bool, dtype: torch.dtype) -> ColumnParallelLinear:
    """q/k/v projections of this rank's heads: ``q_heads``/``kv_heads`` are (first, count)."""
    (qs, qn), (ks, kn) = q_heads, kv_heads
    shards: ShardMap = {
        "q": (qs * head_dim, qn * head_dim, 0),
        "k": (ks * head_dim, kn * head_dim, qn * head_dim),
        "v": (ks * head_dim, kn * head_dim, (qn + kn) * head_dim),
    }
    return ColumnParallelLinear(hidden, shards, bias, dtype)


class SegmentedColumnLinear(ColumnParallelLinear):
    """Column-parallel, where one checkpoint tensor gives this rank several row ranges: Gated
    DeltaNet's ``in_proj_qkv`` is ``[q | k | v]`` and a rank keeps its heads of each segment.
    ``segments``: shard id -> [(start row in the checkpoint tensor, rows, first local row)]."""

    def __init__(self, in_features: int, segments: dict[object, list[tuple[int, int, int]]],
                 dtype: torch.dtype) -> None:
        shards: ShardMap = {sid: (0, sum(n for _, n, _ in segs), segs[0][2]) for sid, segs in segments.items()}
        super().__init__(in_features, shards, False, dtype)
        self.segments = segments

    def load(self, which: str, full, shard_id: object = None) -> None:
        if which != "weight":
            raise ValueError(f"checkpoint has a {which} this layer does not use")
        for src, n, dst in self.segments[shard_id]:
            if isinstance(full, QuantTensor):  # kept quantized: each segment's rows
                quant_linear.take(self, _rows_of(full, src, n, self.in_features), dst)
            else:
                note_checkpoint_dtype(self, full)
                copy_checked(self.weight.data[dst:dst + n], full[src:src + n])


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r W_rᵀ) + b`` with W's input columns split across ranks.

    Rank r holds columns ``[in_start, in_start + local_in)``, matching the sharded output of the
    column-parallel layer before it. Partial products are summed by one all-reduce; the bias is
    added after the reduction (once, identically on every rank).
    """

    def __init__(self, in_range: tuple[int, int], out_features: int, comm: Communicator,
                 bias: bool, dtype: torch.dtype, reduce: bool = True,
                 quant_block: tuple[int, int] | None = None) -> None:
        super().__init__()
        if bias and not reduce:
            raise ValueError("an unreduced row-parallel output cannot take a bias")
        self.in_start, self.local_in = in_range
        self.comm = comm
        self.reduce = reduce  # False: return this rank's partial; the caller reduces it
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.weight_packed: torch.Tensor | None = None
        if quant_block is not None:  # FP8 block-scaled weights (layers/fp8.py)
            make_fp8(self, quant_block, self.in_start, self.local_in)

    def load(self, which: str, full, shard_id: object = None) -> None:
        if which == "weight_scale_inv":
            load_scale_rows(self, full, 0, self.weight.shape[0], 0)
        elif which == "weight" and isinstance(full, QuantTensor):  # kept quantized: this rank's columns
            part = full[:, self.in_start:self.in_start + self.local_in]
            _check_quant_shape(part, (self.weight.shape[0], self.local_in))
            quant_linear.take(self, part, 0)
        elif which == "weight":
            _check_fp8(self.weight, full)
            note_checkpoint_dtype(self, full)
            copy_checked(self.weight.data, full[:, self.in_start:self.in_start + self.local_in])
        elif self.bias is not None:
            copy_checked(self.bias.data, full[:])
        else:
            raise ValueError("checkpoint has a bias this layer does not use")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, local_in] -> [T, out]
        if not self.reduce:
            return project(self, x)
        y = self.comm.all_reduce(project(self, x))
        return y if self.bias is None else y + self.bias


def _rows_of(full, start: int, n: int, in_features: int) -> GroupQuant:
    """Rows ``[start, start + n)`` of a quantized checkpoint weight, shape-checked."""
    part = full[start:start + n]
    _check_quant_shape(part, (n, in_features))
    return part


def _check_quant_shape(part: GroupQuant, want: tuple[int, int]) -> None:
    if part.shape != want:
        raise ValueError(f"expected a slice of shape {want}, got {part.shape}")


def _check_fp8(param: torch.Tensor, full) -> None:
    """An FP8 layer takes only FP8 checkpoint weights (a cast would drop their scales)."""
    dtype = full.dtype if isinstance(full, torch.Tensor) else getattr(full, "dtype", None)
    if param.dtype == FP8 and dtype is not None and dtype != FP8:
        raise CheckpointFormatError(f"the checkpoint stores this weight as {dtype}, but its config declares "
                         "FP8 block-scaled weights for it")
