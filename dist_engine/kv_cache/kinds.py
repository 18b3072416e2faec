"""Cache kinds: what each layer keeps between steps, declared by the layer itself.

A layer's ``cache_kind`` is one of these small frozen specs (per rank: local heads). The runner
allocates each layer's storage from its kind, the driver's bookkeeping and the KV budget work per
kind, and the start-up log states each kind's bytes:

- ``PagedKV``: rows indexed by position in paged blocks (slot = block * block_size + offset),
  the full-attention K/V of a Llama layer (or MLA's shared latent); with ``ratio`` one row per
  that many positions (compressed KV). With ``window`` the layer only attends the last
  ``window`` positions, so blocks wholly behind it are given back as the sequence moves on.
- ``SharedKV``: no storage of its own; the layer attends the paged K/V of an earlier layer
  (Gemma 4's KV-shared layers read the last non-shared layer of their type).
- ``RecurrentState``: a fixed-size state per sequence (Gated DeltaNet: a causal-conv window and
  the delta rule's matrix; DeepSeek-V4: its compressors' open windows), held in slots, one per
  running sequence; its bytes do not grow with the context. A prefix-cache hit resumes from a
  state checkpoint (``StateCheckpoints``).

A layer whose cache has several parts (DeepSeek-V4: a raw window, compressed rows, indexer keys
and its compressors' state) declares ``cache_kinds``, a tuple, and receives a tuple of caches in
the same order; a layer with one part declares ``cache_kind``.

Paged kinds fall into *groups* (full attention, or one sliding window): each group has its own
block ids, block table per sequence and share of the budget, so a model mixing global and
sliding layers frees the sliding layers' old blocks while keeping the global ones. Sizes are
bytes on this rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_engine.layers import turboquant


def group_name(window: int | None) -> str:
    """The paged group of layers attending ``window`` tokens (None: every position)."""
    return "full" if window is None else f"window{window}"


@dataclass(frozen=True)
class PagedKV:
    """K and V rows ``[local_num_kv_heads, head_dim]`` per position (one shared row for MLA),
    or with ``ratio`` > 1 one row per ``ratio`` positions (compressed KV): a block of
    ``block_size`` tokens then holds ``block_size // ratio`` rows. With ``quant`` (a TurboQuant
    preset of ``--kv-cache-dtype``) each head's row is codes and an fp16 scale
    (``layers/tq_cache.py``)."""

    local_num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # storage dtype (the model's, or FP8)
    shared_kv: bool = False  # MLA: one latent serves as K and V
    window: int | None = None  # sliding window in tokens (None: every position is attended)
    ratio: int = 1
    role: str = "K/V"  # what the rows hold, for the start-up log (compressed K/V, indexer keys)
    quant: str | None = None  # "turboquant4" / "turboquant3": codes instead of dtype values

    @property
    def group(self) -> str:
        return group_name(self.window)

    def bytes_per_row(self) -> int:
        if self.quant is not None:
            return self.local_num_kv_heads * turboquant.bytes_per_row(self.quant, self.head_dim, self.shared_kv)
        return (1 if self.shared_kv else 2) * self.local_num_kv_heads * self.head_dim * self.dtype.itemsize

    def bytes_per_block(self, block_size: int) -> int:
        if block_size % self.ratio:
            raise ValueError(f"block_size={block_size} must be a multiple of the compression ratio "
                             f"{self.ratio} (a block holds whole compressed rows)")
        return self.bytes_per_row() * (block_size // self.ratio)


@dataclass(frozen=True)
class SharedKV:
    """Attends layer ``source``'s paged K/V and writes none: allocates nothing, costs no bytes,
    and takes the metadata of ``group`` (the source's group)."""

    source: int  # index of the layer whose cache this one reads (an earlier one)
    group: str


@dataclass(frozen=True)
class RecurrentState:
    """A fixed-size per-sequence state: named tensors (shape without the slot axis, dtype).
    ``grid``: prefill chunks must end on multiples of this many tokens (the chunked delta
    rule's chunk) so that a resumed prefill computes what an uninterrupted one does."""

    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    grid: int = 1
    # The tensors hold one row per position, in a ring indexed by position modulo its length
    # (DeepSeek-V4's compressor windows), long enough that the rows a verification writes for
    # drafts it then rejects never overwrite a row a later step reads: rolling back is leaving
    # the ring as it is, so nothing is kept per token (``layers/state_cache.py``).
    positional: bool = False
    role: str = "state"

    group = "state"

    def bytes_per_seq(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.tensors)


CacheKind = PagedKV | SharedKV | RecurrentState


def declared_kinds(layer) -> tuple[CacheKind, ...] | None:
    """The kinds a layer declares (``cache_kinds``, or ``cache_kind`` alone), None if none."""
    kinds = getattr(layer, "cache_kinds", None)
    if kinds is not None:
        return tuple(kinds)
    kind = getattr(layer, "cache_kind", None)
    return None if kind is None else (kind,)


def paged_groups(kinds: list[CacheKind]) -> list[str]:
    """The paged groups of a model, primary first: full attention if any layer has it (its
    table carries prefix-cache hits), then sliding windows by size. Each has its own block
    ids and table."""
    names = {k.group for k in kinds if isinstance(k, PagedKV)}
    return sorted(names, key=lambda g: (g != "full", int(g[6:]) if g != "full" else 0))


def group_window(group: str) -> int | None:
    return None if group == "full" else int(group.removeprefix("window"))


def bytes_per_block(kinds: list[CacheKind], block_size: int) -> dict[str, int]:
    """Bytes one block of each paged group takes over all its layers on this rank."""
    out: dict[str, int] = {}
    for kind in kinds:
        if isinstance(kind, PagedKV):
            out[kind.group] = out.get(kind.group, 0) + kind.bytes_per_block(block_size)
    return out


def bytes_by_role(kinds: list[CacheKind]) -> dict[str, dict[str, float]]:
    """Per group, what each kind of row costs over all its layers on this rank: paged kinds in
    bytes per token (a compressed kind's row over its ``ratio`` tokens), recurrent ones in bytes
    per sequence; keyed by role (with the ratio for compressed kinds)."""
    out: dict[str, dict[str, float]] = {}
    for k in kinds:
        if isinstance(k, SharedKV):  # reads its source's rows: no bytes of its own
            continue
        if isinstance(k, PagedKV):
            label, cost = (k.role if k.ratio == 1 else f"{k.role} 1/{k.ratio}"), k.bytes_per_row() / k.ratio
        else:
            label, cost = k.role, k.bytes_per_seq()
        group = out.setdefault(k.group, {})
        group[label] = group.get(label, 0) + cost
    return out


def state_bytes_per_seq(kinds: list[CacheKind]) -> int:
    return sum(k.bytes_per_seq() for k in kinds if isinstance(k, RecurrentState))


def state_grid(kinds: list[CacheKind]) -> int:
    return max([k.grid for k in kinds if isinstance(k, RecurrentState)], default=1)


@dataclass(frozen=True)
class CacheLayout:
    """How many of each kind's units a rank holds (the same on every rank)."""

    blocks: tuple[tuple[str, int], ...]  # (paged group, blocks), primary group first
    num_state_slots: int = 0  # live recurrent states: bounds the running sequences
    num_checkpoints: int = 0  # prefix-cache state checkpoints
    state_grid: int = 1  # prefill chunks of sequences with a state end on multiples of this

    @property
    def num_blocks(self) -> int:
        """Blocks of the primary group."""
        return self.blocks[0][1] if self.blocks else 0

    def group_blocks(self, group: str) -> int:
        return dict(self.blocks)[group]

    @property
    def num_state_tensors(self) -> int:
        """Slots a recurrent layer allocates: live states, then checkpoints."""
        return self.num_state_slots + self.num_checkpoints

    def min(self, other: CacheLayout) -> CacheLayout:
        return CacheLayout(tuple((g, min(n, dict(other.blocks)[g])) for g, n in self.blocks),
                           min(self.num_state_slots, other.num_state_slots),
                           min(self.num_checkpoints, other.num_checkpoints), self.state_grid)
