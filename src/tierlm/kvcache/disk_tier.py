"""The local disk KV tier: block files in a spill directory (LRU within `capacity`) and saved caches (read-only).

One writer thread writes spilled blocks (checksummed, fsync'ed, renamed: seconds of disk latency) so no step
waits on a tier write; a block waiting to be written is served from memory. A block that fails its checksum is
deleted (spill directory) and reported; the caller recomputes it.
Invariants: used = the bytes of the spill directory's indexed files <= capacity after each write; a hash is in
at most one of pending, files.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tierlm.kvcache.block_file import CorruptBlockError, StoredBlock, open_block_dir, open_spill_dir, read_block, \
    write_block
from tierlm.kvcache.tier_protocol import Wanted, until_miss

log = logging.getLogger("tierlm.kv")
WRITE_QUEUE = 32  # spills waiting for the writer; a full queue makes the evicting step wait (backpressure)


@dataclass
class DiskCounters:
    writes: int = 0
    restores: int = 0
    corrupt: int = 0  # failed the checksum: deleted, recomputed
    evictions: int = 0  # spilled blocks deleted to keep the tier within its capacity
    write_errors: int = 0  # spills that could not be written (disk full, permissions): dropped, not fatal
    pending_restores: int = 0  # served from the writer's queue (memory speed)


class DiskTier:
    name = "disk"

    def __init__(self, storage: str, salt: bytes, directory: Path | None, codec: str = "none", gbps: float = 1.0,
                 capacity: int | None = None):
        self.storage, self.salt, self.codec, self.gbps, self.capacity = storage, salt, codec, gbps, capacity
        self.counters = DiskCounters()
        self.files: OrderedDict[bytes, Path] = OrderedDict()  # LRU: the spill dir and loaded caches
        self._spilled: dict[bytes, int] = {}  # files of our spill dir (the only ones evicted) -> bytes
        self.used = 0
        self._pending: dict[bytes, StoredBlock] = {}  # queued for the writer
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self._writer: threading.Thread | None = None
        self.directory = None
        if directory is not None:
            self.directory, stale = open_spill_dir(directory, salt)
            if stale:
                log.warning("KV spill directory %s held %d blocks of another model, KV format or numerics: deleted",
                            directory, stale)
            self.add_dir(self.directory)

    def add_dir(self, directory: Path) -> int:
        """Index a saved block directory (its manifest must carry our salt); returns the blocks found. Files
        of the spill directory (left by earlier runs) count against the capacity, oldest evicted first."""
        open_block_dir(directory, self.salt, create=False)
        spill = directory == self.directory
        found = sorted(directory.glob("*.kvb"), key=lambda f: f.stat().st_mtime)
        with self._lock:
            for f in found:
                h = bytes.fromhex(f.stem)
                self.files.setdefault(h, f)
                if spill and h not in self._spilled:
                    self._spilled[h] = f.stat().st_size
                    self.used += self._spilled[h]
            self._enforce_capacity()
        return len(found)

    def __len__(self) -> int:
        return len(self.files)

    # --- the tier protocol ------------------------------------------------------------------------------
    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [h in self._pending or h in self.files for h in hashes]

    def cost(self, nbytes: int, count: int) -> float:
        return count * nbytes / (self.gbps * 1e9)

    def put(self, block: StoredBlock) -> None:
        """Queue a block for the writer (it waits only when WRITE_QUEUE spills are already queued)."""
        if self.directory is None:
            return
        with self._lock:
            if block.hash in self.files:
                self.files.move_to_end(block.hash)
                return
            if block.hash in self._pending:
                return
            self._pending[block.hash] = block
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="tierlm-kv-writer", daemon=True)
            self._writer.start()
        self._queue.put(block)

    def get_many(self, wanted: Sequence[Wanted]) -> list[StoredBlock | None]:
        return until_miss(wanted, self._get)

    def _get(self, h: bytes, tokens: tuple[int, ...]) -> StoredBlock | None:
        with self._lock:
            block = self._pending.get(h)
            path = self.files.get(h)
            if path is not None:
                self.files.move_to_end(h)
        if block is not None:  # still waiting for the writer: served from memory
            if block.tokens != tokens:
                return None
            self.counters.pending_restores += 1
            return block
        if path is None:
            return None
        try:
            block = read_block(path, self.storage)
        except CorruptBlockError:  # corrupt, or evicted by the writer meanwhile
            self.counters.corrupt += path.exists()
            with self._lock:
                self.files.pop(h, None)
                self.used -= self._spilled.pop(h, None) or 0
            if self.directory is not None and path.parent == self.directory:
                path.unlink(missing_ok=True)  # never serve it again; saved caches are left for the user
            return None
        if block.tokens != tokens:
            return None
        self.counters.restores += 1
        return block

    # --- the writer -------------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            block = self._queue.get()
            try:
                if block is None:
                    return
                try:
                    size = write_block(self.directory, block, self.storage, self.codec)
                except Exception:  # disk full, permissions, a codec: the block is dropped, the writer goes on
                    with self._lock:
                        self._pending.pop(block.hash, None)
                        self.counters.write_errors += 1
                    continue
                with self._lock:
                    if self._pending.pop(block.hash, None) is not None:
                        self.files[block.hash] = self.directory / f"{block.hash.hex()}.kvb"
                        self._spilled[block.hash] = size
                        self.used += size
                        self.counters.writes += 1
                        self._enforce_capacity()
            finally:
                self._queue.task_done()

    def _enforce_capacity(self) -> None:
        """Delete the least recently used spilled files until the tier fits (under the lock)."""
        if self.capacity is None:
            return
        for h in list(self.files):
            if self.used <= self.capacity:
                return
            size = self._spilled.pop(h, None)
            if size is None:
                continue  # a loaded (saved) cache: read-only, never deleted
            self.files.pop(h).unlink(missing_ok=True)
            self.used -= size
            self.counters.evictions += 1

    def flush(self) -> None:
        """Wait until every queued spill is written (or failed)."""
        if self._writer is not None:
            self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def items(self) -> list[tuple[bytes, Path]]:
        self.flush()
        with self._lock:
            return list(self.files.items())
