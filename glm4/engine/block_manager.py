"""Paged KV-cache bookkeeping with reference counts and prefix caching. Pure Python (no torch).

The cache is `num_blocks` blocks of `block_size` token slots. A sequence's `block_table` lists its blocks in
position order. Prefix caching:
- Every *full* block of a token sequence has a hash chained over its content and its parent's hash, so equal
  hashes mean equal whole prefixes (blake2b, stable across processes, unlike Python's `hash()`).
- A block's hash is registered only after its K/V has been computed (`cache_full_blocks`, called from the
  scheduler's postprocess), so a hit never points at K/V that is still being written.
- Shared blocks are always full and immutable: a hit never covers the last token of a sequence (at least one
  token must run to produce logits), so new tokens always start in a block of their own.
- Unreferenced blocks sit in a free queue in LRU order and keep their hash until the block is reused for other
  content (eviction), so they can still be hit. Blocks without a hash are handed out first.

API used by the scheduler:
    get_num_cached_prefix_tokens(seq) -> int          # prefix-hit tokens if seq were allocated now
    can_allocate(seq, n) / allocate(seq, n)           # admit a waiting seq: prefix hits + slots for n more tokens
    can_append(seq, n) / append_slot(seq, n)          # grow a running seq's table for its next n tokens
    cache_full_blocks(seq)                            # after a step: register newly computed full blocks
    free(seq)                                         # drop the seq's references (finish, abort, preemption)
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Sequence as Seq

from glm4.engine.sequence import Sequence

_ROOT_HASH = 0


def hash_block_tokens(parent_hash: int, token_ids: Seq[int]) -> int:
    """128-bit hash of one full block chained with its parent's (0 for the first block)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash.to_bytes(16, "little"))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def compute_block_hashes(token_ids: Seq[int], block_size: int, hashes: list[int] | None = None) -> list[int]:
    """Extend `hashes` in place to cover every full block of token_ids (tokens only ever get appended)."""
    hashes = [] if hashes is None else hashes
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else _ROOT_HASH
        hashes.append(hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size]))
    return hashes


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set only while registered in the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks; the first item is the next to hand out (least recently freed).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        # Counters (prompt-side lookups at allocation time; recompute after preemption counts again).
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.num_evictions = 0

    # -- queries -----------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_hashes(self, seq: Sequence) -> list[int]:
        """Chained hashes of the full blocks of seq.token_ids (cached on the seq)."""
        return compute_block_hashes(seq.token_ids, self.block_size, seq.block_hashes)

    def _match_prefix(self, hashes: list[int], num_tokens: int) -> list[int]:
        """Block ids of the longest cached prefix, leaving at least the last token uncached."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (num_tokens - 1) // self.block_size
        hits = []
        for h in hashes[:max_blocks]:
            bid = self._hash_to_block.get(h)
            if bid is None:
                break  # hashes are chained: after a miss nothing further can match
            hits.append(bid)
        return hits

    def get_num_cached_prefix_tokens(self, seq: Sequence | Seq[int]) -> int:
        """Tokens a fresh allocation of this sequence (or token list) would take from the prefix cache."""
        if not self.enable_prefix_caching:
            return 0
        if isinstance(seq, Sequence):
            return len(self._match_prefix(self.block_hashes(seq), len(seq))) * self.block_size
        return len(self._match_prefix(compute_block_hashes(seq, self.block_size), len(seq))) * self.block_size

    def is_block_cached(self, block_hash: int) -> bool:
        return block_hash in self._hash_to_block

    def stats(self) -> dict[str, float]:
        return {"kv_blocks_total": self.num_blocks, "kv_blocks_free": self.num_free_blocks,
                "kv_blocks_cached": self.num_cached_blocks, "prefix_cache_hit_rate": self.hit_rate,
                "prefix_cache_hit_tokens": self.num_hit_tokens, "prefix_cache_query_tokens": self.num_query_tokens,
                "prefix_cache_evictions": self.num_evictions}

    # -- allocation --------------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Could `allocate(seq, num_new_tokens)` succeed now? num_new_tokens counts beyond the prefix hits."""
        hits = self._match_prefix(self.block_hashes(seq), len(seq))
        new_blocks = self.blocks_for_tokens(len(hits) * self.block_size + num_new_tokens) - len(hits)
        # A hit on an unreferenced cached block takes it out of the free queue too.
        revived = sum(1 for bid in hits if self.blocks[bid].ref_count == 0)
        return new_blocks + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give a waiting seq its cached prefix plus slots for its first num_new_tokens uncached tokens."""
        assert not seq.block_table, f"{seq} already holds blocks"
        hits = self._match_prefix(self.block_hashes(seq), len(seq))
        assert len(hits) * self.block_size + num_new_tokens <= len(seq)
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._free[bid]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        self.num_query_tokens += len(seq)
        self.num_hit_tokens += seq.num_cached_tokens
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        needed = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append_slot(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Make the table cover positions up to num_computed_tokens + num_new_tokens - 1."""
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_for_tokens(num_tokens) - len(seq.block_table)
        assert needed <= self.num_free_blocks, "caller must check can_allocate / can_append first"
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:  # evict: the content is about to be overwritten
            if self._hash_to_block.get(block.hash) == bid:
                del self._hash_to_block[block.hash]
            block.hash = None
            self.num_evictions += 1
        block.ref_count = 1
        return bid

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that are now full of computed K/V (call after each model step)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_hashed_blocks:
            return
        hashes = self.block_hashes(seq)
        for i in range(seq.num_hashed_blocks, num_full):
            h = hashes[i]
            # If another sequence computed the same content first, keep its block as the cached one; ours
            # stays private (no hash) and is recycled when this sequence frees it.
            if h not in self._hash_to_block:
                bid = seq.block_table[i]
                self.blocks[bid].hash = h
                self._hash_to_block[h] = bid
        seq.num_hashed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Release the seq's blocks; its K/V is gone from its point of view (num_computed_tokens = 0)."""
        # Tail blocks first, so a sequence's early (more shareable) blocks become the most recently used.
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} freed twice"
            if block.ref_count == 0:
                self._free[bid] = None
                if block.hash is None:
                    self._free.move_to_end(bid, last=False)  # holds nothing reusable: hand it out first
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.num_hashed_blocks = 0
