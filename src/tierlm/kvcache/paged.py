"""The paged KV cache: a pool of fixed-size blocks (pool.py), block tables per sequence, a block manager
(blocks.py) with prefix caching, and tiers below the pool (tier_stack.py) for evicted cached blocks.

    sequence: block table [b0, b1, ...]: token p lives in block table[p // block_size], slot p % block_size

Admission (admit): a sequence takes the cached blocks of its longest cached prefix from the pool, then
restores the following blocks that the host/disk/remote tiers hold (batched: tiers.fetch) when restoring is
predicted cheaper than recomputing; prefill starts after the last block found. Allocation (reserve, before a
step) takes free blocks; a cached block taken for new tokens is first handed to the tiers. A block registered
by a step is also written through to the remote tier, when there is one (step.py).

Lifetimes: the pool is reserved by PagedKV(...) and freed by release(); blocks are taken and returned
through the BlockManager as sequences grow and finish (free()).
"""
from __future__ import annotations

from typing import Callable
from pathlib import Path

import torch

from tierlm.config import ModelConfig
from tierlm.kvcache.block_file import StoredBlock
from tierlm.kvcache.blocks import ROOT_HASH, BlockManager, Evicted, block_hash, matchable
from tierlm.kvcache.pool import KVPool
from tierlm.kvcache.stats import KVStats
from tierlm.kvcache.sequence import DROPPED, KVSequence
from tierlm.kvcache.step import PagedStep
from tierlm.kvcache.remote_tier import Offer, RemoteTier
from tierlm.kvcache.tier_stack import KVTiers

DEFAULT_BLOCK_SIZE = 16


class PagedKV:
    """The pool plus its block manager: what schedulers and the runner use."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 storage: torch.dtype | None = None, caching: bool = True, salt: bytes = b"",
                 host_bytes: int = 0, disk_dir: Path | None = None, codec: str = "none", disk_gbps: float = 1.0,
                 disk_capacity: int | None = None, host_log: Path | None = None, capacity: int | None = None,
                 remote: RemoteTier | None = None):
        self.config, self.block_size, self.device = cfg, block_size, torch.device(device)
        self.pool = KVPool(cfg, num_blocks, block_size, dtype, device, storage, capacity)
        self.manager = BlockManager(num_blocks, block_size, salt, caching, capacity)
        self.tiers = KVTiers(str(self.pool.storage).removeprefix("torch."), salt, host_bytes, disk_dir, codec, disk_gbps,
                             disk_capacity, host_log, remote)
        self.live: set[KVSequence] = set()  # sequences holding blocks (admitted, not yet freed)
        # What waste() reads, kept as blocks are taken and filled instead of walked each decode step: live
        # sequences holding each block they hold, and the token slots filled over those blocks. A block is
        # shared only once full (prefix hits take full blocks), so its fill is its fullest owner's.
        self._holders: dict[int, int] = {}
        self._filled = 0
        self.preemptions = self.recomputed_tokens = 0  # counted by the scheduler, reported by stats()
        self.hit_tokens = self.restored_tokens = self.queried_tokens = 0
        self.prefill_s_per_token: float | None = None  # measured (note_prefill): the recompute side of restore-or-recompute

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    def blocks_needed(self, seq: KVSequence, new_tokens: int) -> int:
        """Blocks to allocate before `new_tokens` more tokens of seq can be stored."""
        need = -(-(seq.num_computed + new_tokens) // self.block_size)
        return max(0, need - len(seq.blocks))

    def can_admit(self, tokens: list[int], extra: int = 1, use_cache: bool = True) -> bool:
        """Would a sequence of `tokens` (+ `extra` to come) get its blocks now? Side-effect free: nothing is
        taken, hashed into counters or restored from a tier (admit + reserve do that, once, when it fits).
        Cached prefix blocks count as held; blocks restored from a tier count as new ones. use_cache: as admit's."""
        hits, hits_free = self.manager.peek_prefix(tokens) if use_cache else (0, 0)
        need = -(-(len(tokens) + extra) // self.block_size) - hits
        return need <= self.manager.num_free - hits_free

    def reserve(self, seq: KVSequence, new_tokens: int) -> None:
        """Allocate the blocks `new_tokens` more tokens of seq will need (the scheduler's side of a step)."""
        for _ in range(self.blocks_needed(seq, new_tokens)):
            seq.blocks.append(self._allocate())
            if seq in self.live:
                self._holders[seq.blocks[-1]] = 1  # empty until a step fills it

    def step(self, seqs: list[KVSequence], t: int) -> "PagedStep":
        """The runner's immutable input for t new tokens of each of seqs, whose blocks are already reserved: a
        step whose rows depend neither on the batch nor on the chunk (blocked attention), except under a
        sliding window (SDPA with its mask)."""
        for s in seqs:
            if s.num_computed + t > len(s.tokens) or self.blocks_needed(s, t):
                raise ValueError("a step past the sequence's known tokens or reserved blocks")
        return PagedStep(self.pool, self.config.sliding_window, seqs, t, self.finish)

    def admit(self, seq: KVSequence, use_cache: bool = True) -> None:
        """Attach seq's longest cached prefix: pool blocks first, then blocks restored from the tiers.
        use_cache=False: none (a request that scores its prompt computes every position); the blocks it fills
        are still registered for later hits, and it counts as no prefix query."""
        assert not seq.blocks
        self.live.add(seq)
        if not use_cache:
            return  # num_computed 0, nothing hashed (free() left the sequence so)
        bs = self.block_size
        seq.blocks, parent = self.manager.match_prefix(seq.tokens)
        hits = len(seq.blocks)
        if self.manager.caching and self.tiers.enabled and self.manager.num_free:
            wanted, h = [], parent
            for start in range(hits * bs, matchable(len(seq.tokens), bs), bs):
                if len(wanted) == self.manager.num_free:
                    break
                tokens = tuple(seq.tokens[start:start + bs])
                h = block_hash(h, tokens, self.manager.salt)
                wanted.append((h, tokens))
            recompute_s = bs * self.prefill_s_per_token if self.prefill_s_per_token else float("inf")
            for stored in self.tiers.fetch(wanted, self.pool.block_bytes, recompute_s):
                block = self._allocate()
                self.pool.write_block(block, stored.payload)
                self.manager.adopt(block, stored.hash, parent, stored.tokens)
                seq.blocks.append(block)
                parent = stored.hash
        seq.parent_hash, seq.num_hashed, seq.num_computed = parent, len(seq.blocks), len(seq.blocks) * bs
        for b in seq.blocks:  # full: counted once, by the first live sequence to hold it
            self._filled += bs if self._hold(b) == 1 else 0
        self.queried_tokens += len(seq.tokens)
        self.hit_tokens += hits * bs
        self.restored_tokens += (len(seq.blocks) - hits) * bs

    def resize(self, n: int) -> bool:
        """The pool's size in blocks, within [the size it started at, its capacity]: memory moved between
        weights and KV (offload/migration.py). Shrinking needs the blocks given up free: their cached prefixes go
        to the tiers, their pages back to the OS. False (nothing changed) when that cannot be done now."""
        old = self.manager.num_blocks
        gone = self.manager.resize(n)
        if gone is None:
            return False
        for block, e in gone:
            self._to_tiers(block, e)
        self.pool.num_blocks = n
        self.pool.discard(n, old)
        return True

    def finish(self, step: PagedStep) -> None:
        """The step's K/V are stored (PagedStep.finish calls this): advance each sequence, register its newly full blocks, and, under a
        sliding window W, free the blocks no later query can see (every key <= num_computed - W): they stay
        cached for prefix hits, but the sequence no longer holds them."""
        bs, man, window = self.block_size, self.manager, self.config.sliding_window
        for s in step.seqs:
            s.num_computed += step.t
            if s in self.live:  # the new tokens fill blocks only s holds (shared ones are full)
                self._filled += step.t
            while (s.num_hashed + 1) * bs <= s.num_computed:
                b = s.num_hashed
                tokens = tuple(s.tokens[b * bs:(b + 1) * bs])
                parent, s.parent_hash = s.parent_hash, man.register(s.blocks[b], s.parent_hash, tokens)
                s.num_hashed += 1
                if self.tiers.writes_through:  # shared with other replicas at once (read and written behind)
                    self.offer_remote(s.blocks[b], s.parent_hash, parent, tokens)
            while window is not None and s.num_dropped < s.num_hashed and \
                    (s.num_dropped + 1) * bs - 1 <= s.num_computed - window:
                man.release(s.blocks[s.num_dropped])
                if s in self.live:
                    self._let_go(s.blocks[s.num_dropped], bs)  # a dropped block is full
                s.blocks[s.num_dropped] = DROPPED
                s.num_dropped += 1

    def note_prefill(self, tokens: int, seconds: float) -> None:
        """A measured prefill: keeps the per-token recompute cost that restore decisions compare against."""
        if tokens >= self.block_size:
            rate = seconds / tokens
            p = self.prefill_s_per_token
            self.prefill_s_per_token = rate if p is None else 0.7 * p + 0.3 * rate

    def offer_remote(self, block: int, h: bytes, parent: bytes, tokens: tuple[int, ...]) -> None:
        """A block just registered, written through to the remote tier: its writer thread reads the block from the
        pool later (reader), so neither the copy nor the write is on the engine's thread."""
        self.tiers.remote.offer(Offer(h, parent, tokens, self.reader(block, h)))

    def reader(self, block: int, h: bytes) -> Callable[[], bytes | None]:
        """Reads pool block `block` on any thread while it still holds prefix h: None once the block was
        reused (its generation moved) or forgotten (hash checked before and after the read: no torn copy)."""
        man, pool, gen = self.manager, self.pool, self.manager.generation[block]

        def read() -> bytes | None:
            if man.generation[block] != gen or man.hash_of.get(block) != h:
                return None
            payload = pool.read_block(block)
            return payload if man.generation[block] == gen and man.hash_of.get(block) == h else None

        return read

    def _allocate(self) -> int:
        """A zeroed block for new tokens; a cached block taken for them goes to the tiers first."""
        block, evicted = self.manager.allocate()
        if evicted is not None:
            self._to_tiers(block, evicted)
        self.pool.zero(block)
        return block

    def _to_tiers(self, block: int, e: Evicted) -> None:
        """What a cached block held, handed to the tiers (when there are any) before the block is reused."""
        if self.tiers.host_bytes or self.tiers.disk_dir is not None:
            self.tiers.put(StoredBlock(e.hash, e.parent, e.tokens, self.pool.read_block(block)))

    def free(self, seq: KVSequence) -> None:
        """Return seq's blocks; its full, hashed ones stay cached until reused."""
        self.manager.release_all(seq.held)
        if seq in self.live:
            for j, b in enumerate(seq.blocks):
                if b != DROPPED:
                    self._let_go(b, min(self.block_size, max(0, seq.num_computed - j * self.block_size)))
        self.live.discard(seq)
        seq.blocks, seq.num_computed, seq.num_hashed, seq.num_dropped, seq.parent_hash = [], 0, 0, 0, ROOT_HASH

    def _hold(self, block: int) -> int:
        """One more live sequence holds block; how many do now."""
        self._holders[block] = self._holders.get(block, 0) + 1
        return self._holders[block]

    def _let_go(self, block: int, fill: int) -> None:
        """A live sequence, whose tokens fill `fill` slots of block, no longer holds it: the last one out takes
        its slots off the count (while others hold it, it is shared, hence full for them too)."""
        if (n := self._holders[block] - 1) == 0:
            del self._holders[block]
            self._filled -= fill
        else:
            self._holders[block] = n

    def filled_slots(self) -> int:
        """Token slots holding a token, over the blocks live sequences hold (a shared block counts once, as
        full as its fullest owner). O(1): kept as blocks are taken, filled and let go (tests/test_kv_fill.py
        checks it against a walk over every block of every live sequence)."""
        return self._filled

    def waste(self) -> float:
        """Allocated-but-unused token slots / allocated slots, over the blocks live sequences hold."""
        used = self.manager.num_blocks - self.manager.num_free
        return 1 - self.filled_slots() / (used * self.block_size) if used else 0.0

    def stats(self) -> KVStats:
        """A snapshot: blocks by state, prefix hits, evictions, preemptions, waste over the live sequences."""
        man = self.manager
        used = man.num_blocks - man.num_free
        cached = man.num_cached_free
        return KVStats(block_size=self.block_size, blocks=man.num_blocks, used=used, cached=cached,
                       free=man.num_free - cached, block_bytes=self.pool.block_bytes,
                       hit_tokens=self.hit_tokens, restored_tokens=self.restored_tokens,
                       queried_tokens=self.queried_tokens, evictions=man.counters.evictions, tiers=self.tiers.snapshot(),
                       preemptions=self.preemptions, recomputed_tokens=self.recomputed_tokens,
                       filled_slots=self.filled_slots(), storage=self.tiers.storage,
                       remote=self.tiers.remote.stats() if self.tiers.remote else None)

    def release(self) -> None:
        self.tiers.close()  # queued spills are written first
        self.pool.release()

