"""How tensor parallelism splits dimensions that need not divide evenly.

Every split is contiguous: rank r owns ``[start, start + size)`` of the full dimension, with the
first ``n % parts`` ranks taking one extra element. Sizes are deliberately allowed to differ
between ranks (9 heads over 2 ranks is 5 + 4, not an error).
"""

from __future__ import annotations

from dataclasses import dataclass


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``n`` items, as equal as possible."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of piece ``index`` of ``split_sizes(n, parts)``."""
    sizes = split_sizes(n, parts)
    return sum(sizes[:index]), sizes[index]


@dataclass(frozen=True)
class HeadPartition:
    """The attention heads one TP rank owns.

    GQA rule: when there are at least as many KV heads as ranks, ranks split the KV heads into
    contiguous (possibly unequal) groups and take every query head that reads them, so a rank
    never needs another rank's K/V. With more ranks than KV heads, each KV head is replicated on
    ``tp // num_key_value_heads`` consecutive ranks, which split that head's query group between them.
    """

    q_start: int
    local_num_heads: int  # query heads on this rank
    kv_start: int
    local_num_kv_heads: int  # KV heads on this rank

    @classmethod
    def for_rank(cls, num_attention_heads: int, num_key_value_heads: int, tp: int, rank: int) -> HeadPartition:
        group = num_attention_heads // num_key_value_heads  # query heads per KV head
        if tp <= num_key_value_heads:
            kv_start, kv_n = split_range(num_key_value_heads, tp, rank)
            return cls(kv_start * group, kv_n * group, kv_start, kv_n)
        if tp % num_key_value_heads:
            raise ValueError(f"TP={tp} > {num_key_value_heads} KV heads must be a multiple of them")
        replicas = tp // num_key_value_heads
        kv_head, sub = divmod(rank, replicas)
        if group < replicas:
            raise ValueError(f"TP={tp} leaves some rank without a query head ({num_attention_heads} heads)")
        q_off, q_n = split_range(group, replicas, sub)
        return cls(kv_head * group + q_off, q_n, kv_head, 1)
