"""Per-sequence recurrent state on one rank (``RecurrentState`` kinds) and its per-step metadata.

A layer with a recurrent state (Gated DeltaNet) keeps, for every slot, the tensors its kind
names: slot s of every such layer together is one sequence's state. Slots ``[0, num_live)`` are
the running sequences' live states; the rest hold prefix-cache checkpoints (the state after a
fixed number of tokens of some prompt), copied from and into live slots by the runner.

The contract a recurrent layer follows each step, per sequence b of ``StateMetadata``:
start from zeros if ``fresh[b]`` else from ``slot slots[b]``; run its ``lengths[b]`` tokens
(token by token if ``recurrent[b]``: decode and verification; else the chunked prefill form,
whose chunks sit on a grid of absolute positions so that a prefill resumed from a checkpoint
computes exactly what an uninterrupted one does); write the final state back into the slot;
and with ``keep_per_token`` (a verification step) also store, for each sequence that runs token
by token, the state after each of its tokens in ``kept[layer][name][b, j]``, from which the
runner restores the state after the accepted tokens once the drafts are judged. A *positional*
state (``RecurrentState.positional``: rows in a ring indexed by position) keeps nothing: the
rows of rejected drafts sit past the accepted position and are rewritten before any read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dist_engine.kv_cache.kinds import RecurrentState


@dataclass
class LayerState:
    """One recurrent layer's slots: ``tensors[name]`` is ``[num_slots, *shape]``."""

    tensors: dict[str, torch.Tensor]
    positional: bool = False  # the kind's rows are indexed by position: no per-token copies

    @classmethod
    def empty(cls, kind: RecurrentState, num_slots: int, device: torch.device) -> LayerState:
        return cls({name: torch.zeros(num_slots, *shape, dtype=dtype, device=device)
                    for name, shape, dtype in kind.tensors}, kind.positional)

    @property
    def num_slots(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def copy_slots(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """State of slots ``src`` ``[N]`` into slots ``dst`` ``[N]`` (restore or save a
        checkpoint)."""
        for t in self.tensors.values():
            t.index_copy_(0, dst, t.index_select(0, src))


@dataclass
class StateMetadata:
    """Where each sequence of a step keeps its recurrent state and how its tokens run; built
    once per step (``worker/batch.py``) and read by every recurrent layer."""

    slots: torch.Tensor  # [B] long: each sequence's live slot, in step order
    starts: list[int]  # flat index of its first token in the step
    lengths: list[int]  # tokens it feeds this step
    positions: list[int]  # absolute position of its first token
    fresh: list[bool]  # it starts at position 0: the state starts from zeros
    recurrent: list[bool]  # token by token (decode, verification) rather than chunked prefill
    keep_per_token: bool = False  # a verification step: keep the state after every token
    # layer index -> tensor name -> [B, max(lengths), *shape]: the states a verification kept
    kept: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
