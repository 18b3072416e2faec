"""This rank's caches, one per layer as its cache kind says, and the budget split between kinds.

Paged kinds get ``num_blocks * block_size`` rows each (block ids are the driver's); recurrent
kinds get ``num_state_slots`` live slots plus ``num_checkpoints`` checkpoint slots. A layer's
cache is its kind's storage, or a tuple of them for a layer declaring several kinds (in the
order of its ``cache_kinds``). The split of a
byte budget: every running sequence needs one state slot (``max_num_seqs`` of them, fewer if the
budget is small: the slots then bound concurrency), checkpoints get their own budget
(``state_checkpoint_memory``), paged blocks the rest.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dist_engine.config import EngineConfig
from dist_engine.kv_cache.kinds import (
    CacheKind,
    CacheLayout,
    PagedKV,
    RecurrentState,
    SharedKV,
    bytes_per_block,
    declared_kinds,
    group_window,
    paged_groups,
    state_bytes_per_seq,
    state_grid,
)
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.state_cache import LayerState
from dist_engine.layers.tq_cache import TurboQuantKV

CHECKPOINT_SHARE = 0.1  # of the KV budget, when state_checkpoint_memory is not given
FIXED_CHECKPOINTS = 8  # with a fixed num_blocks (tests)


LayerCache = LayerKV | LayerState | tuple  # a tuple for a layer declaring several kinds


def layer_kinds(layer: nn.Module, kv_dtype: torch.dtype, window: int | None,
                quant: str | None = None) -> tuple[CacheKind, ...]:
    """The layer's declared kinds; a layer declaring none is a paged attention layer. Every
    paged kind is stored in the KV cache's dtype (FP8 included), or as TurboQuant codes with
    ``quant`` (a preset of ``--kv-cache-dtype``); recurrent state is kept as it is."""
    kinds = declared_kinds(layer)
    if kinds is None:
        attn = layer.self_attn
        kinds = (PagedKV(attn.local_num_kv_heads, attn.head_dim, kv_dtype,
                         shared_kv=getattr(attn, "latent_cache", False), window=window),)
    for k in kinds:
        if quant is not None and isinstance(k, PagedKV) and (k.ratio != 1 or k.role != "K/V"):
            raise ValueError(f"--kv-cache-dtype {quant} stores attention K/V rows as codes; this model "
                             f"also keeps {k.role} rows at ratio {k.ratio} (DeepSeek-V4's compressed "
                             "caches), which it cannot read: use --kv-cache-dtype auto")
    return tuple(dataclasses.replace(k, dtype=kv_dtype, quant=quant) if isinstance(k, PagedKV) else k
                 for k in kinds)


def by_layer(flat: list, layer_kinds: list[tuple[CacheKind, ...]]) -> list[LayerCache]:
    """Each layer's cache from the flat per-kind list: itself, or a tuple for several kinds."""
    out, at = [], 0
    for kinds in layer_kinds:
        part = flat[at:at + len(kinds)]
        out.append(part[0] if len(part) == 1 else tuple(part))
        at += len(kinds)
    return out


def flat_caches(caches: list[LayerCache]) -> list[LayerKV | LayerState]:
    """Every kind's storage, in layer order (the inverse of ``by_layer``)."""
    return [c for entry in caches for c in (entry if isinstance(entry, tuple) else (entry,))]


def _layer_state(entry: LayerCache) -> LayerState | None:
    """A layer's recurrent state (at most one per layer), if it has one."""
    found = [c for c in (entry if isinstance(entry, tuple) else (entry,)) if isinstance(c, LayerState)]
    return found[0] if found else None


def plan_layout(kinds: list[CacheKind], config: EngineConfig, budget: int | None) -> CacheLayout:
    """Units of each kind for ``budget`` bytes (None: ``num_blocks`` is fixed by the config).

    A sliding-window group besides the primary one needs, per running sequence, its window,
    the step's lookahead and a partial block at each end, plus one prefill chunk in flight;
    the primary group (full attention, or the only window) gets what is left."""
    cc, sc = config.cache, config.scheduler
    bs, groups = cc.block_size, paged_groups(kinds)
    per_block = bytes_per_block(kinds, bs)
    per_state = state_bytes_per_seq(kinds)
    secondary = {g: sc.max_num_seqs * (-(-(group_window(g) + sc.num_lookahead_slots) // bs) + 2)
                 + -(-sc.max_num_batched_tokens // bs) for g in groups[1:]}
    if budget is None:
        blocks = ((groups[0], cc.num_blocks), *((g, cc.num_blocks) for g in groups[1:]))
        return CacheLayout(blocks, sc.max_num_seqs if per_state else 0,
                           FIXED_CHECKPOINTS if per_state else 0, state_grid(kinds))
    slots = ckpts = 0
    if per_state:
        ckpt_bytes = (cc.state_checkpoint_memory if cc.state_checkpoint_memory is not None
                      else int(budget * CHECKPOINT_SHARE))
        ckpts = min(ckpt_bytes, budget // 2) // per_state
        slots = min(sc.max_num_seqs, (budget - ckpts * per_state) // 2 // per_state)
        if slots < 1:
            raise ValueError(f"the KV budget ({budget / 2**20:.0f} MiB) cannot hold one sequence's "
                             f"recurrent state ({per_state / 2**20:.1f} MiB) next to its blocks; raise "
                             "--kv-cache-memory or --memory-fraction")
    left = budget - (slots + ckpts) * per_state - sum(n * per_block[g] for g, n in secondary.items())
    primary = left // per_block[groups[0]] if groups else 0
    if groups and primary < 1:
        raise ValueError(f"the KV budget ({budget / 2**20:.0f} MiB) leaves no block for "
                         f"{groups[0]} attention after the sliding-window blocks "
                         f"{sum(secondary.values())} of {sc.max_num_seqs} sequences need; raise "
                         "--kv-cache-memory or lower --max-num-seqs")
    blocks = ((groups[0], primary), *secondary.items()) if groups else ()
    return CacheLayout(blocks, slots, ckpts, state_grid(kinds))


def allocate(kinds: list[CacheKind], layout: CacheLayout, block_size: int, device: torch.device,
             zero_slots: int, extra_blocks: int = 0, scales: list[tuple[float, float]] | None = None,
             dtype: torch.dtype | None = None, k_means: list[torch.Tensor | None] | None = None,
             kv_head_start: int = 0) -> list[LayerKV | TurboQuantKV | LayerState]:
    """One cache per kind; paged ones with their group's blocks and ``extra_blocks`` beyond
    (CUDA graphs' scratch block), ``dtype`` overriding the kind's (calibration runs in full
    precision). TurboQuant layers take their layer index and ``kv_head_start`` (this rank's
    first global KV head) for their rotations, and ``k_means`` (per layer) as mean keys. A
    shared kind's entry is its source's cache itself."""
    out: list[LayerKV | TurboQuantKV | LayerState] = []
    for i, kind in enumerate(kinds):
        if isinstance(kind, SharedKV):
            if not 0 <= kind.source < i or not isinstance(kinds[kind.source], PagedKV):
                raise ValueError(f"layer {i} shares the K/V of layer {kind.source}, which is not an "
                                 "earlier paged attention layer")
            out.append(out[kind.source])
            continue
        if isinstance(kind, RecurrentState):
            out.append(LayerState.empty(kind, layout.num_state_tensors, device))
            continue
        rows = (layout.group_blocks(kind.group) + extra_blocks) * block_size // kind.ratio
        if kind.quant is not None and dtype is None:
            out.append(TurboQuantKV.empty(kind.quant, rows, kind.local_num_kv_heads, kind.head_dim,
                                          device, zero_slots, layer=i, head_start=kv_head_start,
                                          shared=kind.shared_kv,
                                          k_mean=k_means[i] if k_means else None))
            continue
        out.append(LayerKV.empty(rows, kind.local_num_kv_heads, kind.head_dim, dtype or kind.dtype,
                                 device, zero_slots=zero_slots, shared=kind.shared_kv,
                                 scales=scales[i] if scales else (1.0, 1.0)))
    return out


def bytes_by_group(caches: list[LayerKV | LayerState], kinds: list[CacheKind]) -> dict[str, int]:
    """Bytes actually allocated per kind group (what the start-up log's figures must equal)."""
    out: dict[str, int] = {}
    for cache, kind in zip(caches, kinds):
        if isinstance(kind, SharedKV):  # its source's bytes, counted there
            continue
        n = cache.nbytes() if isinstance(cache, (LayerState, TurboQuantKV)) else (
            cache.k.nbytes + (0 if cache.shared else cache.v.nbytes))
        out[kind.group] = out.get(kind.group, 0) + n
    return out


def restore_states(caches: list[LayerCache], layout: CacheLayout, seqs) -> None:
    """Before a step: a sequence resuming from a prefix-cache checkpoint gets it copied into
    its live slot (checkpoint c is slot ``num_state_slots + c``)."""
    pairs = [(s.state_slot, layout.num_state_slots + s.restore_from) for s in seqs
             if s.restore_from is not None]
    if not pairs:
        return
    dst, src = (torch.tensor(x, dtype=torch.long) for x in zip(*pairs))
    for entry in caches:
        cache = _layer_state(entry)
        if cache is not None:
            cache.copy_slots(dst.to(_device(cache)), src.to(_device(cache)))


def settle_states(caches: list[LayerCache], layout: CacheLayout, seqs, meta, verified: list[int]) -> None:
    """After a step: each sequence's live state becomes the state after its ``verified``
    tokens of the step (a verification that rejected drafts takes the state its layers kept
    after the last accepted token), and the checkpoints it was asked to save are saved where
    the step reached their position. A positional state is already right as it is: the rows
    past the accepted position are never read before they are rewritten, and a checkpoint
    saved from it serves any position whose rows it still holds."""
    if meta is None:
        return
    for i, entry in enumerate(caches):
        cache = _layer_state(entry)
        if cache is None:
            continue
        kept = meta.kept.get(i)
        for b, (s, n) in enumerate(zip(seqs, verified)):
            slot = torch.tensor([s.state_slot], device=_device(cache))
            if n < len(s.token_ids) and not cache.positional:  # back to the state after n tokens
                _copy_kept(cache, kept, b, n - 1, slot, i)
            for pos, c in s.save_states:
                at = pos - s.start_pos  # tokens of this step up to the checkpoint
                dst = torch.tensor([layout.num_state_slots + c], device=_device(cache))
                if at == n or (cache.positional and 0 < at < n):
                    cache.copy_slots(dst, slot)
                elif 0 < at < n:
                    _copy_kept(cache, kept, b, at - 1, dst, i)


def _copy_kept(cache: LayerState, kept: dict | None, b: int, j: int, dst: torch.Tensor, layer: int) -> None:
    if kept is None:
        raise RuntimeError(f"recurrent layer {layer} kept no per-token states for a verification step")
    for name, t in cache.tensors.items():
        t.index_copy_(0, dst, kept[name][b, j].unsqueeze(0).to(t.dtype))


def _device(cache: LayerState) -> torch.device:
    return next(iter(cache.tensors.values())).device
