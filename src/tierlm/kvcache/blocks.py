"""The block manager of the paged KV cache: which pool block holds which tokens. Pure bookkeeping, no tensors.

A block holds `block_size` consecutive tokens of one sequence. Blocks are ref-counted: a block shared by
several sequences (a common prefix) is freed when its last user lets go. A freed block that is *full and
hashed* stays findable by its hash (prefix caching) until it is reused for something else.

Free list: one O(1) LRU queue (an OrderedDict) of blocks with refcount 0. Freed blocks join its tail;
allocation takes the head, i.e. the block freed longest ago; a cached block taken from the queue loses its
hash. Uncached free blocks are taken before cached ones (they go to the head on release), so the
prefix cache keeps as much as the pool can hold.

Prefix hashing (as vLLM's automatic prefix caching): a full block's hash is a chain,
sha256(parent hash | salt | its tokens), so equal hashes mean equal whole prefixes, and the salt keeps
caches of different models (or weight schemes) apart. A hit also compares the stored tokens, so a hash
collision can never serve wrong KV.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

ROOT_HASH = b"\0" * 16


def block_hash(parent: bytes, tokens: tuple[int, ...], salt: bytes) -> bytes:
    """16-byte chained hash of a full block: stable across processes (sessions on disk rely on it)."""
    h = hashlib.sha256(parent)
    h.update(salt)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()[:16]


@dataclass(frozen=True)
class Evicted:
    hash: bytes
    parent: bytes
    tokens: tuple[int, ...]


@dataclass
class BlockCounters:
    evictions: int = 0  # cached blocks reused for other tokens


def matchable(n: int, block_size: int) -> int:
    """Tokens of an n-token prompt that a prefix hit may cover: whole blocks, never the last token."""
    return (n - 1) // block_size * block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, salt: bytes = b"", caching: bool = True,
                 capacity: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        # Blocks [0, num_blocks) are in use or free; [num_blocks, capacity) exist only when the pool grows
        # (resize: memory moved from weights to KV). num_blocks never goes below `floor`, the size every
        # accepted request was checked against.
        self.num_blocks, self.block_size, self.salt, self.caching = num_blocks, block_size, salt, caching
        self.floor = num_blocks
        self.capacity = max(capacity or num_blocks, num_blocks)
        self.refcount = [0] * self.capacity
        self.generation = [0] * self.capacity  # + 1 each time a block is allocated: a reader on another thread
        # (the remote tier's writer) knows the block still holds what it was offered when this has not moved
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU: head first
        self.hash_of: dict[int, bytes] = {}  # full, hashed block -> its chain hash
        self.tokens_of: dict[int, tuple[int, ...]] = {}  # its tokens (collision check)
        self.parent_of: dict[int, bytes] = {}  # the hash of the block before it (a lower tier re-links by it)
        self.by_hash: dict[bytes, int] = {}
        self.counters = BlockCounters()

    # --- allocation --------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free ones, cached or not)."""
        return len(self.free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return sum(1 for b in self.free if b in self.hash_of)

    def allocate(self) -> tuple[int, Evicted | None]:
        """A block for new tokens (refcount 1) and, when it was a cached block, what it held (for a lower tier)."""
        if not self.free:
            raise MemoryError("no free KV block")
        block, _ = self.free.popitem(last=False)
        evicted = None
        if block in self.hash_of:  # reusing a cached block: its prefix is no longer findable here
            evicted = Evicted(self.hash_of[block], self.parent_of[block], self.tokens_of[block])
            self._forget(block)
            self.counters.evictions += 1
        self.refcount[block] = 1
        self.generation[block] += 1
        return block, evicted

    def adopt(self, block: int, h: bytes, parent: bytes, tokens: tuple[int, ...]) -> None:
        """Mark a just-allocated block, filled from a lower tier, as the cached block for hash h."""
        if self.caching and h not in self.by_hash:
            self.by_hash[h], self.hash_of[block], self.parent_of[block], self.tokens_of[block] = block, h, parent, tokens

    def release(self, block: int) -> None:
        assert self.refcount[block] > 0, f"block {block} released more often than taken"
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free[block] = None  # tail: reused last
            if block not in self.hash_of:
                self.free.move_to_end(block, last=False)  # nothing cached in it: reuse it first

    def release_all(self, blocks: list[int]) -> None:
        # last block first: a sequence's tail is the least likely part to be shared, so it is evicted first
        for b in reversed(blocks):
            self.release(b)

    def resize(self, n: int) -> list[tuple[int, Evicted]] | None:
        """Grow to n blocks (the new ones free, reused first), or shrink to n when every block in [n, num_blocks)
        is free: they leave the free list, and (block, what it held) is returned for the cached ones (for a
        lower tier, read before the block's memory goes). None:
        cannot shrink now (a block up there is in use) or n is outside [floor, capacity]."""
        if not self.floor <= n <= self.capacity:
            return None
        old = self.num_blocks
        if n >= old:
            for b in range(old, n):
                self.free[b] = None
                self.free.move_to_end(b, last=False)
            self.num_blocks = n
            return []
        if any(self.refcount[b] for b in range(n, old)):
            return None
        out = []
        for b in range(n, old):
            del self.free[b]
            if b in self.hash_of:
                out.append((b, Evicted(self.hash_of[b], self.parent_of[b], self.tokens_of[b])))
                self._forget(b)
        self.num_blocks = n
        return out

    # --- prefix cache ------------------------------------------------------------------------------
    def register(self, block: int, parent: bytes, tokens: tuple[int, ...]) -> bytes:
        """Mark a block just filled with `tokens` (after `parent`) as cached; returns its hash."""
        h = block_hash(parent, tokens, self.salt)
        self.adopt(block, h, parent, tokens)
        return h

    def lookup(self, parent: bytes, tokens: tuple[int, ...]) -> tuple[int | None, bytes]:
        """A cached block holding exactly `tokens` after `parent`, taken (refcount + 1), and the chain hash."""
        h = block_hash(parent, tokens, self.salt)
        block = self.by_hash.get(h) if self.caching else None
        if block is None or self.tokens_of.get(block) != tokens:
            return None, h  # a miss, or a hash collision: never serve it
        if self.refcount[block] == 0:
            del self.free[block]
        self.refcount[block] += 1
        return block, h

    def peek_prefix(self, tokens: list[int]) -> tuple[int, int]:
        """(blocks of the longest cached prefix of `tokens`, how many of them are free now) without taking
        any: admission's side-effect-free probe (match_prefix is the commit)."""
        bs, parent, hits, free = self.block_size, ROOT_HASH, 0, 0
        for start in range(0, matchable(len(tokens), bs) if self.caching else 0, bs):
            part = tuple(tokens[start:start + bs])
            h = block_hash(parent, part, self.salt)
            block = self.by_hash.get(h)
            if block is None or self.tokens_of.get(block) != part:
                break
            hits, free, parent = hits + 1, free + (self.refcount[block] == 0), h
        return hits, free

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], bytes]:
        """Take the cached blocks of the longest cached prefix of `tokens`, leaving at least one token to
        compute (its logits are needed). Returns the blocks and the hash of the last one."""
        bs, parent, blocks = self.block_size, ROOT_HASH, []
        for start in range(0, matchable(len(tokens), bs), bs):
            block, h = self.lookup(parent, tuple(tokens[start:start + bs]))
            if block is None:
                break
            blocks.append(block)
            parent = h
        return blocks, parent

    def _forget(self, block: int) -> None:
        h = self.hash_of.pop(block)
        self.tokens_of.pop(block)
        self.parent_of.pop(block)
        if self.by_hash.get(h) == block:
            del self.by_hash[h]
