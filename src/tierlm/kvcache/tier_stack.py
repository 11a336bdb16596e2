"""KV tiers below the device pool: where cached blocks go, and where a prefix hit can restore from.

    device pool (PagedKV) --evict--> host (RAM, LRU, `host_bytes`) --spill--> disk (block files, LRU within
                          <--------- restore from the first tier that has each block ----------  `disk_capacity`,
                                                                                                 saved caches)
                          --register (write-through)--> remote (Redis shared by replicas; kvcache/remote_tier.py)

Every tier speaks tier_protocol.py's protocol (contains / get_many / put / cost); a prefix hit walks them in order
(host, disk, remote): one batched `contains` per tier for the blocks the earlier ones lack, the run of blocks
found without a gap, restored when the predicted fetch time (each tier's cost: bandwidth and, for Redis, round
trips) is below recomputing those tokens (the measured prefill seconds per token), one `get_many` per tier.
A block that is missing or fails verification ends the run: the caller recomputes from there, so outputs stay
identical. On a CPU-only machine the device pool *is* RAM, so the host tier defaults to 0 bytes there.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tierlm.kvcache.block_file import StoredBlock
from tierlm.kvcache.disk_tier import DiskTier
from tierlm.kvcache.host_tier import HostTier
from tierlm.kvcache.remote_tier import FETCH_BYTES, RemoteTier
from tierlm.kvcache.tier_protocol import KVTier, Wanted


@dataclass
class KVTierCounters:
    host_puts: int = 0
    disk_writes: int = 0
    dropped: int = 0  # evicted with nowhere to go
    host_restores: int = 0
    disk_restores: int = 0
    remote_restores: int = 0
    recompute_chosen: int = 0  # found in a tier, but recomputing was predicted cheaper
    corrupt: int = 0  # failed the checksum: deleted, recomputed
    disk_evictions: int = 0  # spilled blocks deleted to keep the disk tier within its capacity
    write_errors: int = 0  # spills that could not be written (disk full, permissions): dropped, not fatal


class _LiveCounters:
    def __init__(self, tiers: KVTiers):
        self._tiers = tiers

    def __getattr__(self, name: str) -> int:
        return getattr(self._tiers.snapshot(), name)

    def __repr__(self) -> str:
        return repr(self._tiers.snapshot())


class KVTiers:
    """Host, disk and (optionally) remote tiers. The engine's thread calls put / fetch (and offers registered
    blocks to the remote tier: PagedKV.offer_remote); the disk and remote tiers write on threads of their own,
    so no step waits on a tier write."""

    def __init__(self, storage: str, salt: bytes, host_bytes: int = 0, disk_dir: Path | None = None,
                 codec: str = "none", disk_gbps: float = 1.0, disk_capacity: int | None = None,
                 host_log: Path | None = None, remote: RemoteTier | None = None):
        self.storage, self.salt, self.codec = storage, salt, codec
        self.host = HostTier(host_bytes, codec, host_log)  # its bytes live in one preallocated arena
        self.disk = DiskTier(storage, salt, disk_dir, codec, disk_gbps, disk_capacity)
        self.remote = remote
        self._host_puts = self._dropped = self._recompute_chosen = 0

    @property
    def chain(self) -> list[KVTier]:
        """The tiers a restore looks in, fastest first."""
        return [t for t in (self.host, self.disk, self.remote) if t is not None]

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or self.disk_dir is not None or bool(self.disk) or self.remote is not None

    @property
    def counters(self) -> KVTierCounters:
        """A live view: its fields are read from the tiers when read."""
        return _LiveCounters(self)  # type: ignore[return-value]

    def snapshot(self) -> KVTierCounters:
        d, r = self.disk.counters, self.remote.counters if self.remote else None
        return KVTierCounters(host_puts=self._host_puts, disk_writes=d.writes, dropped=self._dropped,
                            host_restores=self.host.restores + d.pending_restores, disk_restores=d.restores,
                            remote_restores=r.restores if r else 0, recompute_chosen=self._recompute_chosen,
                            corrupt=d.corrupt + (r.corrupt if r else 0), disk_evictions=d.evictions,
                            write_errors=d.write_errors)

    # the disk tier's settings, as the engine and the tests name them
    disk_dir = property(lambda self: self.disk.directory)
    disk_capacity = property(lambda self: self.disk.capacity)
    disk_used = property(lambda self: self.disk.used)
    disk_gbps = property(lambda self: self.disk.gbps, lambda self, v: setattr(self.disk, "gbps", v))

    def add_dir(self, directory: Path) -> int:
        """Make a saved block directory restorable (its manifest must carry our salt); returns its blocks."""
        return self.disk.add_dir(directory)

    @property
    def host_bytes(self) -> int:
        """The host tier's limit now (pressure shrinks it; 0: no host tier)."""
        return self.host.limit

    @property
    def host_used(self) -> int:
        return self.host.used

    def put(self, block: StoredBlock) -> None:
        """A cached block leaving the device pool: host, or disk past the host tier; the remote tier has it
        already (written through at registration) unless its queue was full then."""
        if block.hash in self.host:  # already there (a re-put): fresher, not twice
            self.host.touch(block.hash)
            return
        stored, pushed = self.host.put(block)
        self._host_puts += stored
        for b in pushed if stored else [block]:
            self._to_disk(b)

    @property
    def writes_through(self) -> bool:
        return self.remote is not None

    def set_host_limit(self, nbytes: int) -> None:
        """Change the host tier's limit; shrinking spills the least recently used blocks to disk at once and
        hands their pages back to the OS."""
        for b in self.host.set_limit(nbytes):
            self._to_disk(b)

    def _to_disk(self, block: StoredBlock) -> None:
        if self.disk.directory is None:
            self._dropped += 1
            return
        self.disk.put(block)

    def fetch(self, wanted: list[Wanted], block_bytes: int, recompute_s: float) -> Iterator[StoredBlock]:
        """The leading blocks of `wanted` (a prompt's next full blocks, in order) that the tiers hold, fetched
        and verified, when that is predicted faster than recomputing them (`recompute_s` per block); the run
        ends at the first block no tier has or that fails verification. Yielded FETCH_BYTES at a time: the
        caller moves each piece into the pool before the next is read (a restore's transient memory is bounded
        by what kv_remote reserves, not by the prompt)."""
        where: list[KVTier | None] = [None] * len(wanted)
        for tier in self.chain:
            ask = [i for i, t in enumerate(where) if t is None]
            if not ask:
                break
            for i, has in zip(ask, tier.contains([wanted[i][0] for i in ask])):
                if has:
                    where[i] = tier
        run = next((i for i, t in enumerate(where) if t is None), len(where))
        if not run:
            return
        segments: list[tuple[KVTier, int, int]] = []  # (tier, start, end) over the run, in order
        for i in range(run):
            if segments and segments[-1][0] is where[i]:
                segments[-1] = (where[i], segments[-1][1], i + 1)
            else:
                segments.append((where[i], i, i + 1))
        if sum(t.cost(block_bytes, e - s) for t, s, e in segments) > run * recompute_s:
            self._recompute_chosen += 1
            return
        per = max(1, FETCH_BYTES // max(block_bytes, 1))
        for tier, s, e in segments:
            for p in range(s, e, per):
                for b in tier.get_many(wanted[p:min(e, p + per)]):
                    if b is None:
                        return
                    yield b

    def flush(self) -> None:
        """Wait until every queued spill and remote write is done (or failed)."""
        self.disk.flush()
        if self.remote is not None:
            self.remote.flush()

    def close(self) -> None:
        """Write what is queued, then stop the writers and free the host arena (its blocks are dropped)."""
        self.disk.close()
        if self.remote is not None:
            self.remote.close()
        self.host.close()

    def all_blocks(self) -> list[tuple[bytes, StoredBlock | Path]]:
        """Host blocks and disk block files (for save_prefix_cache), every queued spill written first."""
        return [*self.host.items(), *self.disk.items()]
