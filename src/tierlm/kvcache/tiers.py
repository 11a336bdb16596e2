"""KV tiers below the device pool: where evicted cached blocks go, and where a prefix hit can restore from.

    device pool (PagedKV) --evict--> host (RAM, LRU, `host_bytes`) --spill--> disk (block files, `disk_dir`,
                          <-restore-- host                          <-restore-- LRU within `disk_capacity`),
                                                                                and saved caches (read-only)

A block travels as a StoredBlock (hash, parent hash, tokens, raw payload). Restore is chosen over recompute
by cost: payload bytes / tier bandwidth against the measured prefill seconds per token times the block's
tokens. A block that fails its checksum is deleted and reported (the caller recomputes it: outputs stay
identical). On a CPU-only machine the device pool *is* RAM, so the host tier defaults to 0 bytes there.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tierlm.kvcache.block_file import (CorruptBlockError, StoredBlock, open_block_dir, open_spill_dir, read_block,
                                      write_block)
from tierlm.kvcache.host_tier import HostTier

log = logging.getLogger("tierlm.kv")
HOST_GBPS = 8.0  # memcpy into the pool; refined by nothing yet (a host copy is never the slow path)


@dataclass
class TierCounters:
    host_puts: int = 0
    disk_writes: int = 0
    dropped: int = 0  # evicted with nowhere to go
    host_restores: int = 0
    disk_restores: int = 0
    recompute_chosen: int = 0  # found in a tier, but recomputing was predicted cheaper
    corrupt: int = 0  # failed the checksum: deleted, recomputed
    disk_evictions: int = 0  # spilled blocks deleted to keep the disk tier within its capacity
    write_errors: int = 0  # spills that could not be written (disk full, permissions): dropped, not fatal


WRITE_QUEUE = 32  # spills waiting for the writer; a full queue makes the evicting step wait (backpressure)


class KVTiers:
    """Host and disk tiers. The engine's thread calls put / where / take; one writer thread writes spilled
    blocks (checksummed, fsync'ed, renamed: seconds of disk latency) so no step waits on a tier write. A block
    waiting to be written is served from memory. Invariants: disk_used = the bytes of the spill directory's
    indexed files <= disk_capacity after each write; a hash is in at most one of host, pending, disk."""

    def __init__(self, store: str, salt: bytes, host_bytes: int = 0, disk_dir: Path | None = None,
                 codec: str = "none", disk_gbps: float = 1.0, disk_capacity: int | None = None,
                 host_log: Path | None = None):
        self.store, self.salt, self.codec, self.disk_gbps = store, salt, codec, disk_gbps
        self.host = HostTier(host_bytes, codec, host_log)  # its bytes live in one preallocated arena
        self.counters = TierCounters()
        self.disk_capacity = disk_capacity  # None: no limit
        self.disk: OrderedDict[bytes, Path] = OrderedDict()  # on disk, LRU: the spill dir and loaded caches
        self._spilled: dict[bytes, int] = {}  # files of our spill dir (the only ones evicted) -> bytes
        self.disk_used = 0
        self._pending: dict[bytes, StoredBlock] = {}  # queued for the writer
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self._writer: threading.Thread | None = None
        self.disk_dir = None
        if disk_dir is not None:
            self.disk_dir, stale = open_spill_dir(disk_dir, salt)
            if stale:
                log.warning("KV spill directory %s held %d blocks of another model, KV format or numerics: deleted",
                            disk_dir, stale)
        if self.disk_dir is not None:
            self.add_dir(self.disk_dir)

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or self.disk_dir is not None or bool(self.disk)

    def add_dir(self, directory: Path) -> int:
        """Index a saved block directory (its manifest must carry our salt); returns the blocks found. Files
        of the spill directory (left by earlier runs) count against the capacity, oldest evicted first."""
        open_block_dir(directory, self.salt, create=False)
        spill = directory == self.disk_dir
        files = sorted(directory.glob("*.kvb"), key=lambda f: f.stat().st_mtime)
        with self._lock:
            for f in files:
                h = bytes.fromhex(f.stem)
                self.disk.setdefault(h, f)
                if spill and h not in self._spilled:
                    self._spilled[h] = f.stat().st_size
                    self.disk_used += self._spilled[h]
            self._enforce_capacity()
        return len(files)

    @property
    def host_bytes(self) -> int:
        """The host tier's limit now (pressure shrinks it; 0: no host tier)."""
        return self.host.limit

    @property
    def host_used(self) -> int:
        return self.host.used

    def put(self, block: StoredBlock) -> None:
        """A cached block leaving the device pool."""
        if block.hash in self.host:  # already there (a re-put): fresher, not twice
            self.host.touch(block.hash)
            return
        stored, pushed = self.host.put(block)
        self.counters.host_puts += stored
        for b in pushed if stored else [block]:
            self._to_disk(b)

    def set_host_limit(self, nbytes: int) -> None:
        """Change the host tier's limit; shrinking spills the least recently used blocks to disk at once and
        hands their pages back to the OS."""
        for b in self.host.set_limit(nbytes):
            self._to_disk(b)

    def _to_disk(self, block: StoredBlock) -> None:
        if self.disk_dir is None:
            self.counters.dropped += 1
            return
        with self._lock:
            if block.hash in self.disk:
                self.disk.move_to_end(block.hash)
                return
            if block.hash in self._pending:
                return
            self._pending[block.hash] = block
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="tierlm-kv-writer", daemon=True)
            self._writer.start()
        self._queue.put(block)  # waits only when WRITE_QUEUE spills are already queued

    def _write_loop(self) -> None:
        while True:
            block = self._queue.get()
            try:
                if block is None:
                    return
                try:
                    size = write_block(self.disk_dir, block, self.store, self.codec)
                except Exception:  # disk full, permissions, a codec: the block is dropped, the writer goes on
                    with self._lock:
                        self._pending.pop(block.hash, None)
                        self.counters.write_errors += 1
                    continue
                with self._lock:
                    if self._pending.pop(block.hash, None) is not None:
                        self.disk[block.hash] = self.disk_dir / f"{block.hash.hex()}.kvb"
                        self._spilled[block.hash] = size
                        self.disk_used += size
                        self.counters.disk_writes += 1
                        self._enforce_capacity()
            finally:
                self._queue.task_done()

    def _enforce_capacity(self) -> None:
        """Delete the least recently used spilled files until the tier fits (under the lock)."""
        if self.disk_capacity is None:
            return
        for h in list(self.disk):
            if self.disk_used <= self.disk_capacity:
                return
            size = self._spilled.pop(h, None)
            if size is None:
                continue  # a loaded (saved) cache: read-only, never deleted
            self.disk.pop(h).unlink(missing_ok=True)
            self.disk_used -= size
            self.counters.disk_evictions += 1

    def flush(self) -> None:
        """Wait until every queued spill is written (or failed)."""
        if self._writer is not None:
            self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer and free the host arena (its blocks are dropped)."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        self.host.close()

    def where(self, h: bytes) -> str | None:
        if h in self.host:
            return "host"
        with self._lock:
            return "host" if h in self._pending else "disk" if h in self.disk else None

    def restore_s(self, tier: str, nbytes: int) -> float:
        return nbytes / ((HOST_GBPS if tier == "host" else self.disk_gbps) * 1e9)

    def take(self, h: bytes, tokens: tuple[int, ...]) -> StoredBlock | None:
        """The block for hash h holding exactly `tokens`, or None (absent, another prefix, or corrupt)."""
        if h in self.host:
            block = self.host.take(h, tokens)  # it moves back to the device pool
            self.counters.host_restores += block is not None
            return block
        with self._lock:
            block = self._pending.get(h)
            path = self.disk.get(h)
            if path is not None:
                self.disk.move_to_end(h)
        if block is not None:  # still waiting for the writer: served from memory
            if block.tokens != tokens:
                return None
            self.counters.host_restores += 1
            return block
        if path is None:
            return None
        try:
            block = read_block(path, self.store)
        except (CorruptBlockError, FileNotFoundError) as e:  # corrupt, or evicted by the writer meanwhile
            self.counters.corrupt += isinstance(e, CorruptBlockError)
            with self._lock:
                self.disk.pop(h, None)
                size = self._spilled.pop(h, None)
                self.disk_used -= size or 0
            if self.disk_dir is not None and path.parent == self.disk_dir:
                path.unlink(missing_ok=True)  # never serve it again; saved caches are left for the user
            return None
        if block.tokens != tokens or block.hash != h:
            return None
        self.counters.disk_restores += 1
        return block

    def all_blocks(self) -> list[tuple[bytes, StoredBlock | Path]]:
        """Host blocks and disk block files (for save_prefix_cache), every queued spill written first."""
        self.flush()
        with self._lock:
            return [*self.host.items(), *self.disk.items()]
