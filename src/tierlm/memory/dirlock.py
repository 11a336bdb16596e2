"""An exclusive lock on a directory (flock on `DIR/.lock`), so two processes never write the same store at
once: the second waits, then finds the first one's work done and reuses it.

The lock is advisory and released by the kernel when the process dies (no stale lock after a kill). Where
the lock file cannot be created (a read-only store, a directory we may only read) nothing is locked: such a
store can only be read, and a write attempted later fails with its own clear error.
"""
from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tierlm.errors import is_storage_error

LOCK_FILE = ".lock"


@contextmanager
def dir_lock(directory: Path, waiting_note: str | None = None) -> Iterator[bool]:
    """Hold the lock of `directory` (which must exist) for the block; yields whether it is held. When another
    process holds it, `waiting_note` (if given) is printed to stderr once before waiting."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if not is_storage_error(e):
            raise
        fd = -1
    if fd < 0:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_note:
                print(waiting_note, file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock
