"""KV tiers below the device pool: where evicted cached blocks go, and where a prefix hit can restore from.

    device pool (PagedKV) --evict--> host (RAM, LRU, `host_bytes`) --spill--> disk (block files, `disk_dir`)
                          <-restore-- host                          <-restore-- disk, and saved caches (read-only)

A block travels as a StoredBlock (hash, parent hash, tokens, raw payload). Restore is chosen over recompute
by cost: payload bytes / tier bandwidth against the measured prefill seconds per token times the block's
tokens. A block that fails its checksum is deleted and reported (the caller recomputes it: outputs stay
identical). On a CPU-only machine the device pool *is* RAM, so the host tier defaults to 0 bytes there.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tierlm.kvcache.block_file import CorruptBlockError, StoredBlock, open_block_dir, read_block, write_block

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


class KVTiers:
    def __init__(self, store: str, salt: bytes, host_bytes: int = 0, disk_dir: Path | None = None,
                 codec: str = "none", disk_gbps: float = 1.0):
        self.store, self.salt, self.host_bytes, self.codec, self.disk_gbps = store, salt, host_bytes, codec, disk_gbps
        self.host: OrderedDict[bytes, StoredBlock] = OrderedDict()  # LRU: oldest first
        self.host_used = 0
        self.disk_dir = open_block_dir(disk_dir, salt, create=True) if disk_dir is not None else None
        self.disk: dict[bytes, Path] = {}  # blocks on disk: the spill dir and loaded (read-only) caches
        if self.disk_dir is not None:
            self.add_dir(self.disk_dir)
        self.counters = TierCounters()

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or self.disk_dir is not None or bool(self.disk)

    def add_dir(self, directory: Path) -> int:
        """Index a saved block directory (its manifest must carry our salt); returns the blocks found."""
        open_block_dir(directory, self.salt, create=False)
        found = 0
        for f in directory.glob("*.kvb"):
            self.disk.setdefault(bytes.fromhex(f.stem), f)
            found += 1
        return found

    def put(self, block: StoredBlock) -> None:
        """A cached block leaving the device pool."""
        if self.host_bytes >= len(block.payload):
            self.host[block.hash] = block
            self.host_used += len(block.payload)
            self.counters.host_puts += 1
            while self.host_used > self.host_bytes:
                _, old = self.host.popitem(last=False)
                self.host_used -= len(old.payload)
                self._to_disk(old)
        else:
            self._to_disk(block)

    def _to_disk(self, block: StoredBlock) -> None:
        if self.disk_dir is None:
            self.counters.dropped += 1
        elif block.hash not in self.disk:
            write_block(self.disk_dir, block, self.store, self.codec)
            self.disk[block.hash] = self.disk_dir / f"{block.hash.hex()}.kvb"
            self.counters.disk_writes += 1

    def where(self, h: bytes) -> str | None:
        return "host" if h in self.host else "disk" if h in self.disk else None

    def restore_s(self, tier: str, nbytes: int) -> float:
        return nbytes / ((HOST_GBPS if tier == "host" else self.disk_gbps) * 1e9)

    def take(self, h: bytes, tokens: tuple[int, ...]) -> StoredBlock | None:
        """The block for hash h holding exactly `tokens`, or None (absent, another prefix, or corrupt)."""
        if h in self.host:
            block = self.host[h]
            if block.tokens != tokens:
                return None
            del self.host[h]  # it moves back to the device pool
            self.host_used -= len(block.payload)
            self.counters.host_restores += 1
            return block
        path = self.disk.get(h)
        if path is None:
            return None
        try:
            block = read_block(path, self.store)
        except CorruptBlockError:
            self.counters.corrupt += 1
            self.disk.pop(h, None)
            if self.disk_dir is not None and path.parent == self.disk_dir:
                path.unlink(missing_ok=True)  # never serve it again; saved caches are left for the user
            return None
        if block.tokens != tokens or block.hash != h:
            return None
        self.counters.disk_restores += 1
        return block

    def all_blocks(self) -> list[tuple[bytes, StoredBlock | Path]]:
        """Host blocks and disk block files (for save_prefix_cache)."""
        return [*self.host.items(), *self.disk.items()]
