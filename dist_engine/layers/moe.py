"""Mixture-of-experts pieces with DeepSeek-V3's routing; experts are sharded across TP ranks.

Routing (``TopkRouter``): sigmoid scores of a replicated fp32 gate (DeepSeek-V4: sqrt(softplus));
a per-expert correction bias is added for *choosing* only; experts are split into ``n_group``
groups, each scored by the sum of its two best biased scores, the best ``topk_group`` groups stay
eligible, and the top ``num_experts_per_tok`` experts among them are chosen. Their weights are
the unbiased scores, optionally normalised to sum to one, times ``routed_scaling_factor``.
DeepSeek-V4's first layers route by token id instead (``HashRouter``: a fixed table of
``num_experts_per_tok`` experts per vocabulary entry), weighted by the same scores; its experts
clamp the SwiGLU inputs (``swiglu_limit``).

Expert parallelism: rank r holds the contiguous expert range ``split_range(E, tp, r)`` with full
weights per expert and computes, for every token, the weighted outputs of its own experts only;
the model sums the ranks' partials with one all-reduce. Other ranks' experts have no module here,
and the model tells the loader to skip them, so their tensors are never read.

With an expert cache (``--expert-cache-memory``, ``dist_engine/experts/``) a layer holds no
routed expert at all: it registers with the cache, which pages its experts from the checkpoint
under the rank's budget, and the loader skips them too.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dist_engine.distributed.comm import Communicator
from dist_engine.distributed.partition import split_range
from dist_engine.layers.linear import ColumnParallelLinear, RowParallelLinear, merged_column
from dist_engine.layers.loading import copy_checked

SCORES = {"sigmoid": torch.sigmoid, "sqrtsoftplus": lambda x: F.softplus(x).sqrt()}

if TYPE_CHECKING:
    from dist_engine.experts.cache import ExpertCache


class TopkRouter(nn.Module):
    """``scoring="sigmoid"``: DeepSeek-V3's routing above (``"sqrtsoftplus"``: DeepSeek-V4's,
    ungrouped). ``"softmax"`` (Qwen3-MoE): softmax over all experts, the top ``top_k``
    (optionally renormalised); no groups, no bias."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, scaling: float, scoring: str = "sigmoid") -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.scaling, self.scoring = norm_topk_prob, scaling, scoring
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)  # fp32
        self.e_score_correction_bias = (nn.Parameter(torch.zeros(num_experts), requires_grad=False)
                                        if scoring in SCORES else None)

    def load(self, which: str, full, shard_id: object = None) -> None:
        copy_checked(getattr(self, which).data, full[:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, hidden]`` -> (weights ``[T, k]`` fp32, expert ids ``[T, k]``)."""
        T, E = x.shape[0], self.weight.shape[0]
        if self.scoring == "softmax":
            weights, ids = F.linear(x.float(), self.weight).softmax(-1).topk(self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            return weights * self.scaling, ids
        scores = SCORES[self.scoring](F.linear(x.float(), self.weight))  # [T, E]
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            groups = choice.view(T, self.n_group, E // self.n_group)
            group_score = groups.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(E // self.n_group, dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class HashRouter(nn.Module):
    """DeepSeek-V4's hash routing: the experts of each token are ``tid2eid[token id]`` ``[k]``
    (a fixed table), weighted by their normalised scores of the gate, times the scaling."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, vocab_size: int, scaling: float,
                 scoring: str) -> None:
        super().__init__()
        self.top_k, self.scaling, self.scoring = top_k, scaling, scoring
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)  # fp32
        self.tid2eid = nn.Parameter(torch.zeros(vocab_size, top_k, dtype=torch.long), requires_grad=False)

    def load(self, which: str, full, shard_id: object = None) -> None:
        copy_checked(getattr(self, which).data, full[:].to(getattr(self, which).dtype))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, hidden]``, token_ids ``[T]`` -> (weights ``[T, k]`` fp32, expert ids ``[T, k]``)."""
        scores = SCORES[self.scoring](F.linear(x.float(), self.weight))  # [T, E]
        ids = self.tid2eid[token_ids]
        weights = scores.gather(1, ids)
        return weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.scaling, ids


def swiglu(gate_up: torch.Tensor, limit: float | None, act=F.silu) -> torch.Tensor:
    """``act(gate) * up`` of ``[N, 2I]`` (gate first; SiLU, or Gemma 4's tanh GELU); with
    ``limit`` the gate is clamped from above and up to ``[-limit, limit]`` first (DeepSeek-V4)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return act(gate) * up


class Expert(nn.Module):
    """One expert's gated MLP (SwiGLU, or ``act`` for another gate) with full (unsharded)
    weights: gate and up in one matmul."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, quant: tuple[int, int] | None = None,
                 limit: float | None = None, act=F.silu) -> None:
        super().__init__()
        self.limit, self.act = limit, act
        self.gate_up_proj = ColumnParallelLinear(hidden, {0: (0, inter, 0), 1: (0, inter, inter)}, False,
                                                 dtype, quant)
        self.down_proj = ColumnParallelLinear(inter, {None: (0, hidden, 0)}, False, dtype, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden]
        return self.down_proj(swiglu(self.gate_up_proj(x), self.limit, self.act))


class ExpertDict(nn.ModuleDict):
    """This rank's experts keyed by expert id, so that per-expert checkpoint names
    (``experts.{id}.gate_proj``) resolve directly. Checkpoints that fuse every expert into 3-D
    tensors (Qwen3.5-MoE: ``experts.gate_up_proj`` ``[E, 2I, H]``, gate rows first, and
    ``experts.down_proj`` ``[E, H, I]``) load through ``load_fused``, which reads only this
    rank's experts' slices."""

    def __init__(self, experts: dict[str, Expert], num_experts: int) -> None:
        super().__init__(experts)
        self.num_experts = num_experts

    def load_fused(self, which: str, full) -> list[tuple[str, object]]:
        """Copy every local expert's slice of a fused tensor; returns the (parameter name under
        this dict, shard id) pairs it filled, for the loader's completeness check."""
        if which not in ("gate_up_proj", "down_proj"):
            raise ValueError(f"fused expert tensor {which!r} is not gate_up_proj or down_proj")
        if full.shape[0] != self.num_experts:
            raise ValueError(f"expected {self.num_experts} experts on dim 0, got {tuple(full.shape)}")
        filled: list[tuple[str, object]] = []
        for key, expert in self.items():
            w = full[int(key)]  # [2I, H] or [H, I]: this expert's slice only
            if which == "down_proj":
                expert.down_proj.load("weight", w)
                filled.append((f"{key}.down_proj.weight", None))
                continue
            if w.shape[0] % 2:
                raise ValueError(f"gate_up_proj rows {w.shape[0]} do not split into gate and up")
            inter = w.shape[0] // 2
            for part, rows in enumerate((w[:inter], w[inter:])):
                expert.gate_up_proj.load("weight", rows, part)
                filled.append((f"{key}.gate_up_proj.weight", part))
        return filled


def local_experts(hidden: int, inter: int, expert_range: tuple[int, int], dtype: torch.dtype,
                  quant: tuple[int, int] | None = None, limit: float | None = None,
                  num_experts: int | None = None) -> ExpertDict:
    """This rank's experts ``[first, first + count)`` of ``num_experts`` (default: these)."""
    first, count = expert_range
    return ExpertDict({str(e): Expert(hidden, inter, dtype, quant, limit) for e in range(first, first + count)},
                      num_experts if num_experts is not None else first + count)


def expert_output(expert: nn.Module, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e`` over all of its tokens in one product: (their rows ``[n]``, weight x
    expert(x) ``[n, hidden]``). x ``[T, hidden]``; weights, ids ``[T, k]``."""
    token, slot = torch.where(ids == e)
    return token, expert(x[token]) * weights[token, slot].unsqueeze(-1).to(x.dtype)


def add_in_order(x: torch.Tensor, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The experts' outputs summed in ascending expert id (the same order on every rank and
    whether experts are resident or paged, so both give the same bits): ``[T, hidden]``."""
    out = torch.zeros_like(x)
    for e in sorted(parts):
        out.index_add_(0, *parts[e])
    return out


def run_experts(experts: nn.ModuleDict, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
    """Sum over the experts in ``experts`` (this rank's) of weight x expert(x): ``[T, hidden]``,
    a partial that the ranks' all-reduce completes. x ``[T, hidden]``; weights, ids ``[T, k]``."""
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():  # ascending, as add_in_order
        if str(e) in experts:
            out.index_add_(0, *expert_output(experts[str(e)], x, weights, ids, e))
    return out


class SharedExperts(nn.Module):
    """The always-on experts as one SwiGLU MLP, intermediate dim split over TP ranks; returns
    this rank's partial (the MoE block reduces it together with the routed experts)."""

    def __init__(self, hidden: int, inter: int, comm: Communicator, dtype: torch.dtype,
                 quant: tuple[int, int] | None = None, limit: float | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.gate_up_proj = merged_column(hidden, [inter, inter], comm, dtype, quant)
        self.down_proj = RowParallelLinear(split_range(inter, comm.world_size, comm.rank), hidden,
                                           comm, False, dtype, reduce=False, quant_block=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x), self.limit))


class SparseMoE(nn.Module):
    """The MoE block of DeepSeek-V3 and Qwen3-MoE under HF's names (``gate``, ``experts.{id}``, ``shared_experts``):
    routed experts sharded by expert over TP ranks, shared experts by intermediate dim, one
    all-reduce for both. With ``expert_cache`` the routed experts are paged by the cache
    (``experts`` is None) instead of held; ``layer`` is the block's checkpoint layer index (the
    order layers run in) and ``prefix`` its routed experts' checkpoint names (default
    ``model.layers.{layer}.mlp.experts.``)."""

    def __init__(self, hidden: int, num_experts: int, inter: int, num_shared: int, top_k: int,
                 n_group: int, topk_group: int, norm_topk_prob: bool, scaling: float,
                 comm: Communicator, dtype: torch.dtype, quant: tuple[int, int] | None = None,
                 scoring: str = "sigmoid", limit: float | None = None,
                 hash_vocab: int | None = None, packed_experts: bool = False, layer: int = 0,
                 expert_cache: ExpertCache | None = None, prefix: str | None = None) -> None:
        """``quant``: FP8 block size of the expert weights; ``packed_experts``: the routed
        experts arrive kept quantized (``quant/``, e.g. DeepSeek-V4's MXFP4) and take no FP8
        form, the shared experts keep ``quant``; ``hash_vocab``: route by token id (V4's hash
        layers)."""
        super().__init__()
        self.comm = comm
        self.expert_range = split_range(num_experts, comm.world_size, comm.rank)
        self.gate = (HashRouter(hidden, num_experts, top_k, hash_vocab, scaling, scoring) if hash_vocab
                     else TopkRouter(hidden, num_experts, top_k, n_group, topk_group, norm_topk_prob,
                                     scaling, scoring))
        routed_quant = None if packed_experts else quant
        if expert_cache is None:
            self.experts = local_experts(hidden, inter, self.expert_range, dtype, routed_quant, limit, num_experts)
            self.paged = None
        else:
            self.experts = None
            self.paged = expert_cache.register(layer, prefix or f"model.layers.{layer}.mlp.experts.",
                                               self.expert_range,
                                               lambda: Expert(hidden, inter, dtype, routed_quant, limit), self.gate)
        self.shared_experts = (SharedExperts(hidden, inter * num_shared, comm, dtype, quant, limit)
                               if num_shared else None)

    def skips_tensor(self, rest: str) -> bool:
        """The checkpoint tensor ``...mlp.experts.{rest}`` is not loaded into this module: the
        expert cache pages every routed expert, or another rank owns this one."""
        if self.paged is not None:
            return True
        expert = rest.split(".")[0]
        first, count = self.expert_range
        return expert.isdigit() and not first <= int(expert) < first + count

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's routed experts' partial ``[T, hidden]``, held or paged (``token_ids``
        ``[T]`` let a paged layer prefetch a hash-routed next layer's experts exactly)."""
        if self.paged is not None:
            return self.paged.run(x, weights, ids, token_ids)
        return run_experts(self.experts, x, weights, ids)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[T, hidden]``; ``token_ids`` ``[T]`` for hash routing."""
        # [T, k] each, identical on every rank
        weights, ids = self.gate(x, token_ids) if isinstance(self.gate, HashRouter) else self.gate(x)
        y = self.routed(x, weights, ids, token_ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return self.comm.all_reduce(y)

    @classmethod
    def from_config(cls, cfg, comm: Communicator, dtype: torch.dtype, layer: int = 0,
                    expert_cache: ExpertCache | None = None) -> SparseMoE:
        return cls(cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.n_shared_experts,
                   cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                   cfg.routed_scaling_factor, comm, dtype, cfg.fp8_block, cfg.moe_scoring, layer=layer,
                   expert_cache=expert_cache)


_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(.+)$")


def skipped_expert(layers: nn.ModuleList, name: str) -> bool:
    """``name`` is a routed expert's tensor the loader must not read here: another rank holds it,
    or the expert cache pages it."""
    m = _EXPERT.match(name)
    if m is None or int(m.group(1)) >= len(layers):
        return False
    mlp = layers[int(m.group(1))].mlp
    return isinstance(mlp, SparseMoE) and mlp.skips_tensor(m.group(2))
