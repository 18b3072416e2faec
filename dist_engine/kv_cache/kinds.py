"""Cache kinds: what each layer keeps between steps, declared by the layer itself.

A layer's ``cache_kind`` is one of these small frozen specs (per rank: local heads). The runner
allocates each layer's storage from its kind, the driver's bookkeeping and the KV budget work per
kind, and the start-up log states each kind's bytes:

- ``PagedKV``: rows indexed by position in paged blocks (slot = block * block_size + offset),
  the full-attention K/V of a Llama layer (or MLA's shared latent). With ``window`` the layer
  only attends the last ``window`` positions, so blocks wholly behind it may be freed.
- ``RecurrentState``: a fixed-size state per sequence (Gated DeltaNet: a causal-conv window and
  the delta rule's matrix), held in slots, one per running sequence; its bytes do not grow with
  the context. A prefix-cache hit resumes from a state checkpoint (``StateCheckpoints``).

Sizes are bytes on this rank; ``group`` tells the driver which block table a paged kind reads
(layers of one group share block ids and their blocks are freed together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedKV:
    """K and V rows ``[local_num_kv_heads, head_dim]`` per position (one shared row for MLA)."""

    local_num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # storage dtype (the model's, or FP8)
    shared_kv: bool = False  # MLA: one latent serves as K and V
    window: int | None = None  # sliding window in tokens (None: every position is attended)

    @property
    def group(self) -> str:
        return "full" if self.window is None else f"window{self.window}"

    def bytes_per_token(self) -> int:
        rows = 1 if self.shared_kv else 2
        return rows * self.local_num_kv_heads * self.head_dim * self.dtype.itemsize


@dataclass(frozen=True)
class RecurrentState:
    """A fixed-size per-sequence state: named tensors (shape without the slot axis, dtype)."""

    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    group = "state"

    def bytes_per_seq(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.tensors)


CacheKind = PagedKV | RecurrentState


def kinds_summary(kinds: list[CacheKind]) -> dict[str, int]:
    """Bytes this rank needs per token of each paged group and per sequence of state, over
    all layers: ``{"full": B/token, "window4096": B/token, "state": B/sequence}``."""
    out: dict[str, int] = {}
    for kind in kinds:
        size = kind.bytes_per_token() if isinstance(kind, PagedKV) else kind.bytes_per_seq()
        out[kind.group] = out.get(kind.group, 0) + size
    return out
