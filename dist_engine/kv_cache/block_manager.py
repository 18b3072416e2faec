"""Paged KV block bookkeeping for the whole world, in plain Python (no tensors).

A block id names the same logical block on every rank, so one manager on the driver decides
for all of them. Blocks are reference counted; a full block of *verified* tokens gets a digest
of its token chain (sha256 of the parent's digest and its token ids, the first block's parent
being the sequence's cache namespace) and can be shared by any later sequence with the same
prefix in the same namespace. The digest is collision resistant, so a hit needs no token check
and a crafted prompt cannot land on another prefix's blocks; sequences whose namespaces differ
(another tenant's ``cache_salt``, blocks without the MTP layer's K/V) never share a block.
Unreferenced blocks sit in an LRU free list and keep their digest until they are reused, so a
prefix can hit even after its sequence finished. Eviction takes the least recently freed
block first; a freed sequence's blocks enter tail-first, so its prefix outlives its suffix.

Sequence sharding (context parallelism): with S shards, block id b lives on shard ``b mod S``
and logical block i of every sequence is taken from shard ``i mod S``, so a sequence's blocks are
striped over the shards and a cached prefix block is always on the shard its position needs.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

Digest = bytes  # 32 bytes of sha256


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: Digest | None = None  # set once the block is full of verified tokens


def namespace_digest(*keys: str | None) -> Digest:
    """The root of a hash chain: every key that must match for two sequences to share blocks
    (a tenant's cache salt, whether the blocks hold the MTP layer's K/V, ...), in order."""
    h = hashlib.sha256(b"dist_engine.prefix.v1")
    for key in keys:
        h.update(b"\x00" if key is None else b"\x01" + key.encode() + b"\xff")
    return h.digest()


ROOT = namespace_digest()  # no salt at all
_BIG_ENDIAN = array("q", [1]).tobytes()[0] != 1


def chain_hash(parent: Digest, tokens: tuple[int, ...] | list[int]) -> Digest:
    """sha256 of the parent block's digest and this block's token ids (int64, little endian)."""
    ids = array("q", tokens)
    if _BIG_ENDIAN:
        ids.byteswap()
    return hashlib.sha256(parent + ids.tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_next_token: bool = False, num_shards: int = 1) -> None:
        self.block_size = block_size
        self.num_shards = num_shards
        # With an MTP layer, slot p of its cache depends on token p + 1: a block's hash then
        # covers the token after it too, so a prefix hit is valid for that layer as well.
        self.extra = int(hash_next_token)
        self.num_blocks = num_blocks
        self.prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # one LRU free list per shard
        self.free: list[OrderedDict[int, None]] = [
            OrderedDict((i, None) for i in range(s, num_blocks, num_shards)) for s in range(num_shards)]
        self.cached: dict[Digest, int] = {}  # chain digest -> block id
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    # ---- queries -----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return sum(len(f) for f in self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- allocation ----------------------------------------------------------------------
    def _take_free(self, shard: int) -> int:
        block_id, _ = self.free[shard].popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def match_prefix(self, token_ids: list[int], root: Digest = ROOT) -> tuple[list[int], list[Digest]]:
        """Take references on the cached blocks that start ``token_ids`` (full blocks only).

        At least one token is always left uncached: the step that computes it yields the logits
        the next token is drawn from. ``root`` (``namespace_digest``) starts the hash chain:
        blocks committed under one root are found only under the same one.
        """
        if not self.prefix_caching:
            return [], []
        hits: list[int] = []
        hashes: list[Digest] = []
        parent = root
        max_blocks = (len(token_ids) - 1) // self.block_size
        for b in range(max_blocks):
            tokens = tuple(token_ids[b * self.block_size:(b + 1) * self.block_size + self.extra])
            parent = chain_hash(parent, tokens)
            block_id = self.cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
            hashes.append(parent)
        self.share(hits)
        self.prefix_query_tokens += len(token_ids)
        self.prefix_hit_tokens += len(hits) * self.block_size
        return hits, hashes

    def share(self, block_ids: list[int]) -> list[int]:
        """Take one more reference on each of ``block_ids`` (full blocks another table reads)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id % self.num_shards][block_id]
            block.ref_count += 1
        return list(block_ids)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Append blocks to ``block_table`` until it holds ``num_tokens``; all or nothing."""
        first, end = len(block_table), self.blocks_for(num_tokens)
        if end <= first:
            return True
        S = self.num_shards
        for s in range(S):
            if len(range(first + (s - first) % S, end, S)) > len(self.free[s]):
                return False
        block_table.extend(self._take_free(i % S) for i in range(first, end))
        return True

    def commit(self, block_table: list[int], block_hashes: list[Digest], token_ids: list[int],
               num_verified: int, root: Digest = ROOT) -> None:
        """Hash the full blocks among the first ``num_verified`` tokens so others can share them.

        ``block_hashes`` (the sequence's chain so far) is extended in place, so each block is
        hashed once. Only verified tokens count: a block holding drafts is never hashed.
        """
        if not self.prefix_caching:
            return
        bs = self.block_size
        for b in range(len(block_hashes), min(num_verified, len(token_ids) - self.extra) // bs):
            parent = block_hashes[-1] if block_hashes else root
            h = chain_hash(parent, tuple(token_ids[b * bs:(b + 1) * bs + self.extra]))
            self.mark(block_table[b], h)
            block_hashes.append(h)

    def mark(self, block_id: int, digest: Digest) -> None:
        """``block_id`` holds the content ``digest`` names (a later prefix may share it)."""
        block = self.blocks[block_id]
        if block.hash is None and self.prefix_caching:
            block.hash = digest
            self.cached.setdefault(digest, block_id)

    def free_blocks(self, block_table: list[int]) -> None:
        """Drop one reference on each block; unreferenced ones join the free list tail-first."""
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id % self.num_shards][block_id] = None
        block_table.clear()
