"""A preallocated arena with a best-fit allocator: host-tier KV blocks (variable size under zstd) live here
instead of one heap object each, so the process's memory is bounded by the arena, whatever the mix of sizes.

Why our own allocator: one heap object per block leaves the C allocator to place ~100 KiB-1 MiB objects of
ever-changing sizes; freed holes it cannot reuse stay in the process (RSS creeps; benchmarks/soak.py replays
a served trace on both designs). Here the bytes are one anonymous mapping of `capacity`, pages committed as
first written, and `trim()` hands the pages of free extents back to the OS (madvise DONTNEED) when the tier
shrinks under pressure.

    alloc(n) -> offset | None      the smallest free extent that fits (best fit), split; None when none does
    free(offset)                   coalesced with free neighbours at once: no two free extents are adjacent
    fragmentation                  1 - largest_free / total_free (0: all free space is one extent)

Invariants: extents are ALIGN-aligned; used and free extents tile [0, capacity) exactly; free extents are
never adjacent (checked by `check()` in the tests).
"""
from __future__ import annotations

import bisect
import mmap
from dataclasses import dataclass

ALIGN = 64  # a cache line: payload copies start aligned, and alignment waste stays < 64 B per block
PAGE = mmap.PAGESIZE


def _up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class ArenaStats:
    capacity: int
    used: int  # bytes in live allocations (aligned sizes)
    largest_free: int
    free_extents: int
    allocations: int  # live
    failed: int  # alloc() calls that found no extent (the caller evicted or went elsewhere)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def fragmentation(self) -> float:
        """1 - largest_free / total_free: the share of free bytes a request as big as all free space can't use."""
        return 1.0 - self.largest_free / self.free if self.free else 0.0

    @property
    def utilisation(self) -> float:
        return self.used / self.capacity if self.capacity else 0.0


class Arena:
    """Lifetime: the owner creates it at its capacity and close()s it; offsets are valid until free()."""

    def __init__(self, capacity: int):
        self.capacity = _up(max(capacity, 0), PAGE)
        self._map: mmap.mmap | None = mmap.mmap(-1, self.capacity) if self.capacity else None
        self._by_size: list[tuple[int, int]] = []  # free extents (size, offset), sorted: best fit = bisect
        self._free_at: dict[int, int] = {}  # offset -> size of a free extent
        self._free_end: dict[int, int] = {}  # end -> offset of a free extent (to coalesce with the one before)
        self._used: dict[int, int] = {}  # offset -> aligned size of a live allocation
        self.used = 0
        self.failed = 0
        if self.capacity:
            self._add_free(0, self.capacity)

    def _add_free(self, off: int, size: int) -> None:
        bisect.insort(self._by_size, (size, off))
        self._free_at[off], self._free_end[off + size] = size, off

    def _remove_free(self, off: int, size: int) -> None:
        i = bisect.bisect_left(self._by_size, (size, off))
        del self._by_size[i]
        del self._free_at[off], self._free_end[off + size]

    def alloc(self, nbytes: int) -> int | None:
        n = _up(max(nbytes, 1))
        i = bisect.bisect_left(self._by_size, (n, -1))
        if i == len(self._by_size):
            self.failed += 1
            return None
        size, off = self._by_size[i]
        self._remove_free(off, size)
        if size > n:
            self._add_free(off + n, size - n)
        self._used[off] = n
        self.used += n
        return off

    def free(self, off: int) -> None:
        n = self._used.pop(off)  # KeyError: not a live allocation (a double free is a bug)
        self.used -= n
        start, end = off, off + n
        if start in self._free_end:  # the extent just before is free: merge
            before = self._free_end[start]
            self._remove_free(before, start - before)
            start = before
        if end in self._free_at:  # the extent just after is free: merge
            after = self._free_at[end]
            self._remove_free(end, after)
            end += after
        self._add_free(start, end - start)

    def write(self, off: int, data: bytes | memoryview) -> None:
        if len(data) > self._used[off]:
            raise ValueError(f"{len(data)} bytes do not fit the allocation of {self._used[off]} at {off}")
        self._map[off:off + len(data)] = data

    def read(self, off: int, nbytes: int) -> bytes:
        if nbytes > self._used[off]:
            raise ValueError(f"{nbytes} bytes past the allocation of {self._used[off]} at {off}")
        return self._map[off:off + nbytes]

    def trim(self) -> int:
        """Give the whole pages inside free extents back to the OS; returns the bytes advised."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return 0
        done = 0
        for off, size in self._free_at.items():
            lo, hi = _up(off, PAGE), (off + size) // PAGE * PAGE
            if hi > lo:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                done += hi - lo
        return done

    def stats(self) -> ArenaStats:
        largest = self._by_size[-1][0] if self._by_size else 0
        return ArenaStats(self.capacity, self.used, largest, len(self._by_size), len(self._used), self.failed)

    def check(self) -> None:
        """Assert the invariants (tests): used and free extents tile the arena, no two free ones touch."""
        extents = sorted([(o, s, "used") for o, s in self._used.items()]
                         + [(o, s, "free") for o, s in self._free_at.items()])
        pos, last = 0, ""
        for off, size, kind in extents:
            assert off == pos and off % ALIGN == 0, f"gap or overlap at {off} (expected {pos})"
            assert not (kind == last == "free"), f"adjacent free extents at {off}"
            pos, last = off + size, kind
        assert pos == self.capacity and sorted(self._by_size) == self._by_size
        assert sum(self._used.values()) == self.used

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
