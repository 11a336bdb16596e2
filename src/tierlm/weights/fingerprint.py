"""The model's content fingerprint: what its files hold (architecture, tokenizer and weights, as stored), not
where they lie. Two copies of one model (another directory, a reinstalled package, another machine) get the same
fingerprint; any other model, or an edited file, another.

    fingerprint = XXH3-128 over (each file's name-less bytes, in the source's file order)

Hashing a 7B GGUF (3.9 GB) costs a few seconds once: the result is remembered per file identity (resolved path,
size, mtime, inode) in `$XDG_CACHE_HOME/tierlm/fingerprints.json` (written atomically), so later loads read no
byte. Files are read in 4 MiB chunks whose pages are dropped from the page cache as they go: under a memory budget
the page cache is not a hidden tier.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash

from tierlm.config import cache_dir
from tierlm.progress import progress_bar

CHUNK = 4 << 20
CACHE_ENTRIES = 256  # file identities remembered (oldest forgotten first)


def cache_path() -> Path:
    return cache_dir() / "fingerprints.json"


def _identity(f: Path) -> str:
    st = f.stat()
    return f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def file_digest(f: Path, progress: bool | None = None) -> str:
    """XXH3-128 of one file's bytes, its pages dropped from the page cache behind the reads."""
    h = xxhash.xxh3_128()
    size = f.stat().st_size
    buf = bytearray(CHUNK)  # one buffer, reused: hashing a 4 GB file costs 4 MiB of memory
    view = memoryview(buf)
    with open(f, "rb", buffering=0) as fh, progress_bar(size, f"fingerprint {f.name}", progress, "B") as bar:
        fd, done = fh.fileno(), 0
        while n := fh.readinto(buf):
            h.update(view[:n])
            os.posix_fadvise(fd, done, n, os.POSIX_FADV_DONTNEED)
            done += n
            bar.update(n)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # pages readahead had in flight at a chunk's drop
    return h.hexdigest()


def _load_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, cache: dict[str, str]) -> None:
    from tierlm.kvcache.block_file import atomic_write  # the one atomic writer
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = dict(list(cache.items())[-CACHE_ENTRIES:])
        atomic_write(path, json.dumps(keep).encode())
    except Exception:  # noqa: BLE001 - a read-only home costs a re-hash next time, never a failed load
        pass


def content_fingerprint(files: list[Path], progress: bool | None = None, cache: Path | None = None) -> str:
    """The fingerprint of a model stored in `files` (ModelSource.files(): a GGUF file, or a directory's
    config, tokenizer and weight files), from the cache when no file changed since it was computed."""
    path = cache if cache is not None else cache_path()
    known = _load_cache(path)
    h, changed = xxhash.xxh3_128(), False
    for f in files:
        ident = _identity(f)
        digest = known.get(ident)
        if digest is None:
            digest = known[ident] = file_digest(f, progress)
            changed = True
        h.update(digest.encode())
    if changed:
        _save_cache(path, known)
    return h.hexdigest()
