"""Reads that bypass the OS page cache, so the disk tier is measured and used honestly.

O_DIRECT needs the buffer, the file offset and the length aligned (4 KiB covers every device here);
buffers come from anonymous mmap, which is page-aligned. Where O_DIRECT is refused (tmpfs, some network
filesystems) reads are buffered and followed by posix_fadvise(DONTNEED) so the pages do not stay cached.
"""
from __future__ import annotations

import errno
import ctypes
import mmap
import os
from pathlib import Path

import torch

ALIGN = 4096


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


HUGE_PAGE = 2 << 20


class AlignedBuffer:
    """Page-aligned host memory. Lifetime: created by its owner, close() when done (explicit, no GC reliance)."""

    def __init__(self, nbytes: int):
        self.nbytes = align_up(max(nbytes, 1))
        # NOTE: buffers of a huge page or more start on a 2 MiB boundary and ask for transparent huge pages:
        # a streamed layer's kernels then walk it with as few TLB misses as torch's own (huge-page) allocations
        # give resident weights (measured: int4 decode over a 4 KiB-paged ring slot ran 35% slower).
        huge = self.nbytes >= HUGE_PAGE
        self._offset = 0
        self._map: mmap.mmap | None = mmap.mmap(-1, self.nbytes + (HUGE_PAGE if huge else 0))
        if huge:
            address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            self._offset = -address % HUGE_PAGE
            if hasattr(mmap, "MADV_HUGEPAGE"):
                self._map.madvise(mmap.MADV_HUGEPAGE)

    @property
    def view(self) -> memoryview:
        if self._map is None:
            raise ValueError("buffer is closed")
        return memoryview(self._map)[self._offset:self._offset + self.nbytes]

    def tensor(self) -> torch.Tensor:
        """The whole buffer as a uint8 tensor sharing its memory (a view: keep the buffer open while it lives)."""
        return torch.frombuffer(self.view, dtype=torch.uint8)

    def close(self) -> None:
        # NOTE: raises BufferError while tensors viewing this memory are alive: freeing memory in use is a bug.
        if self._map is not None:
            self._map.close()
            self._map = None


class DirectFile:
    """A file opened for reading with O_DIRECT when the filesystem allows it."""

    def __init__(self, path: str | Path, direct: bool = True):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if not self.direct:
            self.fd = os.open(self.path, os.O_RDONLY)

    def read_into(self, buf: memoryview, offset: int, nbytes: int) -> int:
        """Read `nbytes` at `offset` into the start of `buf`; returns bytes read (short only at EOF).
        With O_DIRECT, offset must be aligned and buf must hold align_up(nbytes)."""
        if self.direct:
            if offset % ALIGN:
                raise ValueError(f"O_DIRECT offset {offset} is not {ALIGN}-aligned")
            want = align_up(nbytes)
        else:
            want = nbytes
        done = 0
        while done < want:
            n = os.preadv(self.fd, [buf[done:want]], offset + done)
            if n == 0:
                break  # EOF
            done += n
        if not self.direct:
            os.posix_fadvise(self.fd, offset, done, os.POSIX_FADV_DONTNEED)
        return min(done, nbytes)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_from_page_cache(path: str | Path) -> None:
    """Ask the kernel to evict a file's clean pages (after fsync, every page is clean)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
