"""The host-RAM KV tier: evicted cached blocks, LRU, their bytes in one preallocated arena (kvcache/arena.py).

    put(block) -> blocks pushed out     the oldest blocks leave until the new one fits (they go to disk)
    take(h, tokens) -> block | None     a prefix hit: the block leaves the tier (back to the device pool)
    set_limit(n) -> blocks pushed out   shrink (pressure) or grow back, never past the arena's capacity

With codec "zstd" a block is stored compressed (level 1: ~0.5 ms for a 360 KiB block), so sizes vary and
the tier holds more blocks per byte. `log`: a file that gets one line per allocation ("p OFFSET BYTES") and
free ("f OFFSET"), for replaying a served workload's allocations on another design (benchmarks/soak.py).
Invariant: used <= limit <= capacity; every entry owns exactly one live arena allocation.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from tierlm.kvcache.block_file import StoredBlock, codec_module
from tierlm.kvcache.tier_protocol import Wanted, until_miss
from tierlm.kvcache.arena import ALIGN, Arena, ArenaStats

HOST_GBPS = 8.0  # memcpy into the pool (a host copy is never the slow path)


@dataclass(frozen=True)
class _Entry:
    parent: bytes
    tokens: tuple[int, ...]
    off: int  # arena offset
    stored: int  # bytes in the arena (compressed or not)
    nbytes: int  # the block's raw payload


class HostTier:
    def __init__(self, capacity: int, codec: str = "none", log: Path | None = None):
        self.arena = Arena(capacity)
        self.capacity = self.limit = self.arena.capacity if capacity else 0
        mod = codec_module(codec)
        self._compress = mod.ZstdCompressor(level=1).compress if mod else None
        self._decompress = mod.ZstdDecompressor().decompress if mod else None
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU: oldest first
        self.restores = 0  # blocks taken back to the pool by get_many
        self._log: IO[str] | None = open(log, "a", buffering=1 << 16) if log else None

    @property
    def used(self) -> int:
        return self.arena.used

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, h: bytes) -> bool:
        return h in self.entries

    def touch(self, h: bytes) -> None:
        self.entries.move_to_end(h)

    def stats(self) -> ArenaStats:
        return self.arena.stats()

    # --- the KV tier protocol (tier_protocol.py); put spills through KVTiers, which sends what it pushes out to disk -----
    name = "host"

    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        return [h in self.entries for h in hashes]

    def get_many(self, wanted: Sequence[Wanted]) -> list[StoredBlock | None]:
        got = until_miss(wanted, self.take)
        self.restores += sum(b is not None for b in got)
        return got

    def cost(self, nbytes: int, count: int) -> float:
        return count * nbytes / (HOST_GBPS * 1e9)

    def put(self, block: StoredBlock) -> tuple[bool, list[StoredBlock]]:
        """(stored here, the blocks pushed out to make room). A block larger than the limit is not stored."""
        data = self._compress(block.payload) if self._compress else block.payload
        if -(-len(data) // ALIGN) * ALIGN > self.limit:
            return False, []
        out = []
        while (off := self._alloc(len(data))) is None:
            out.append(self._pop_oldest())  # LRU order; best fit then finds room in what they leave
        self.arena.write(off, data)
        self.entries[block.hash] = _Entry(block.parent, block.tokens, off, len(data), len(block.payload))
        if self._log:
            self._log.write(f"p {off} {len(data)}\n")
        return True, out

    def _alloc(self, n: int) -> int | None:
        if self.used + -(-n // ALIGN) * ALIGN > self.limit:
            return None
        return self.arena.alloc(n)

    def _payload(self, e: _Entry) -> bytes:
        raw = self.arena.read(e.off, e.stored)
        return raw if self._decompress is None else self._decompress(raw, max_output_size=e.nbytes)

    def _free(self, e: _Entry) -> bytes:
        payload = self._payload(e)
        self.arena.free(e.off)
        if self._log:
            self._log.write(f"f {e.off}\n")
        return payload

    def _pop_oldest(self) -> StoredBlock:
        h, e = self.entries.popitem(last=False)
        return StoredBlock(h, e.parent, e.tokens, self._free(e))

    def take(self, h: bytes, tokens: tuple[int, ...]) -> StoredBlock | None:
        e = self.entries.get(h)
        if e is None or e.tokens != tokens:
            return None
        del self.entries[h]
        return StoredBlock(h, e.parent, e.tokens, self._free(e))

    def set_limit(self, nbytes: int) -> list[StoredBlock]:
        """The tier's limit (clamped to the arena); shrinking pushes out the oldest blocks and hands their
        pages back to the OS."""
        self.limit = max(0, min(nbytes, self.capacity))
        out = []
        while self.used > self.limit:
            out.append(self._pop_oldest())
        if out:
            self.arena.trim()
        return out

    def items(self) -> list[tuple[bytes, StoredBlock]]:
        """Every block, decoded (they stay in the tier): for save_prefix_cache."""
        return [(h, StoredBlock(h, e.parent, e.tokens, self._payload(e))) for h, e in self.entries.items()]

    def close(self) -> None:
        if self._log:
            self._log.close()
            self._log = None
        self.arena.close()
