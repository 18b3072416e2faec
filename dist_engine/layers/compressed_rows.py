"""Where a compressed kind's rows live on this rank for one step (``CompressedRows``).

A compressed kind (``PagedKV(ratio=m)``: DeepSeek-V4's compressed KV and indexer keys) keeps
row ``w`` of a sequence, the summary of positions ``[w m, (w + 1) m)``, in the block that holds
those positions: a block of ``B`` tokens holds ``B / m`` rows, so row ``w`` sits in the
sequence's logical block ``w m // B`` at row ``w mod (B / m)`` of it. Blocks are striped over
the sequence shards like K/V (block id ``b`` on shard ``b mod S``, local block ``b // S``), so
each rank stores the rows of its own blocks and attends only those.

Row ``w`` is complete once position ``(w + 1) m - 1`` is computed, so the step that feeds
positions ``[s, s + L)`` completes rows ``[s // m, (s + L) // m)``, and a query at position
``p`` may read rows ``w < (p + 1) // m``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressedRows:
    """One ratio's rows for the sequences of a step (in step order), on this rank."""

    ratio: int
    count: list[int]  # rows complete after the step, per sequence: (start + length) // ratio
    slots: torch.Tensor  # [B, R] long: local slot of each row < count (0 elsewhere / not here)
    local: torch.Tensor  # [B, R] bool: row < count and this rank stores it
    new_first: list[int]  # first row the step completes, per sequence
    new_end: list[int]  # one past the last
    write_slots: torch.Tensor  # [E] long: slot of each completed row (sequence-major), or -1 elsewhere

    def query_limit(self, positions: torch.Tensor) -> torch.Tensor:
        """How many rows a query at each of ``positions`` may read: ``(p + 1) // ratio``."""
        return torch.div(positions + 1, self.ratio, rounding_mode="floor")


def build_rows(seqs, ratio: int, block_size: int, shard: int, num_shards: int,
               device: torch.device) -> CompressedRows:
    """``seqs``: the step's ``SeqWork``s (primary block tables, global block ids)."""
    B, per_block = len(seqs), block_size // ratio
    count = [s.context_len // ratio for s in seqs]
    R = max(1, max(count))
    tables = torch.zeros(B, -(-R * ratio // block_size), dtype=torch.long)
    for b, s in enumerate(seqs):
        used = min(len(s.block_table), tables.shape[1])
        tables[b, :used] = torch.tensor(s.block_table[:used], dtype=torch.long)
    rows = torch.arange(R)
    ids = tables[:, rows // per_block]  # [B, R] global block of each row
    valid = rows.view(1, R) < torch.tensor(count).view(B, 1)
    local = valid & (ids % num_shards == shard)
    slots = torch.where(local, ids // num_shards * per_block + rows % per_block, 0)
    first = [s.start_pos // ratio for s in seqs]
    end = list(count)
    seq = torch.cat([torch.full((e - f,), b, dtype=torch.long) for b, (f, e) in enumerate(zip(first, end))])
    row = torch.cat([torch.arange(f, e) for f, e in zip(first, end)])
    write = torch.where(local[seq, row], slots[seq, row], -1)
    return CompressedRows(ratio, count, slots.to(device), local.to(device), first, end, write.to(device))
