"""The C allocator's policy for a process that promises a memory budget (glibc only; a no-op elsewhere).

glibc serves allocations above a *dynamic* threshold with mmap and returns them to the OS on free, but it
raises that threshold to the size of any mmapped block freed (up to 32 MiB). After the first large
temporary is freed (a weight piece, a prefill activation), blocks of up to 32 MiB come from the heap, and
freed heap memory stays in the process unless it happens to sit at the top. Threads (the loader's) each get
an arena of their own that keeps what they freed, too. So RSS keeps what the budget thought was released.
Measured on the embedded model under cpu=96MiB (peak anonymous memory above the baseline): 164 MiB with
glibc's defaults, 104 MiB with one arena and a fixed 4 MiB threshold. A smaller threshold gives little
more (101 MiB at 256 KiB) and costs a fresh mmap and its page faults per piece temporary: a 7B load took
25 s instead of 15. trim() hands back what the heap holds free after a phase such as loading.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # mallopt parameters (malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@functools.cache
def return_freed_memory_promptly() -> bool:
    """One arena and a fixed mmap threshold for this process; True where applied. Call before any thread
    allocates. NOTE: process-wide by nature; idempotent, and only ever makes freed memory go back sooner."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> None:
    """Give the heap's free memory back to the OS (after loading: its transients are gone)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_MADV_DONTNEED = 4  # sys/mman.h (Linux)


def discard(address: int, nbytes: int) -> int:
    """Give back the whole pages inside [address, address + nbytes) of an anonymous mapping (their contents read
    as zeros afterwards); returns the bytes given back. A no-op without glibc."""
    import mmap
    libc = _libc()
    page = mmap.PAGESIZE
    lo, hi = -(-address // page) * page, (address + nbytes) // page * page
    if libc is None or hi <= lo:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return hi - lo if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0 else 0
