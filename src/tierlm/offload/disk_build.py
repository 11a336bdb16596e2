"""The offload store's write side: encoding units into their aligned extents, building a whole store (data, then
manifest, crash-safe) and rewriting one unit in place when OffloadStore.repair() rebuilds it from the source.

Build order: drop the old manifest and data, write the data to a temp file, fsync, rename; then the manifest
likewise, last. Builds hold `DIR/.lock`, so two processes never write one store at once. A repaired unit must
come out byte-for-byte as the manifest records it (the same source and the same code give the same bytes);
a chunk that differs is never written. The format itself is in disk_layout.py.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash

from tierlm.config import format_size
from tierlm.errors import StorageError, is_storage_error, storage_error
from tierlm.offload import disk_layout as layout
from tierlm.memory.directio import align_up, drop_from_page_cache
from tierlm.memory.dirlock import dir_lock
from tierlm.offload.disk_layout import (DATA_FILE, MANIFEST, ChecksumError, Origin, StoredTensor, StoredUnit,
                                          checksum)
from tierlm.offload.disk_manifest import encode_manifest
from tierlm.offload.units import EMBED, HEAD, unit_nbytes, unit_tensors
from tierlm.progress import progress_bar
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import QuantTensor
from tierlm.weights.source import ModelSource
from tierlm.offload.unit_load import load_unit_tensor


class _ChunkedSum:
    """checksum() per CHUNK_BYTES of a byte stream, fed in arbitrary pieces."""

    def __init__(self) -> None:
        self.sums: list[int] = []
        self._h, self._filled = xxhash.xxh3_64(), 0

    def update(self, data: bytes | memoryview) -> None:
        data = memoryview(data)
        while len(data):
            take = min(layout.CHUNK_BYTES - self._filled, len(data))
            self._h.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == layout.CHUNK_BYTES:
                self.sums.append(self._h.intdigest())
                self._h, self._filled = xxhash.xxh3_64(), 0

    def finish(self) -> list[int]:
        if self._filled:
            self.sums.append(self._h.intdigest())
        return self.sums


def _encode_unit(source: ModelSource, name: str, offset: int, dtype: torch.dtype, quant: QuantScheme,
                 present: set[str], write: Callable[[memoryview], object]) -> StoredUnit:
    """Encode unit `name` as its extent, passing the bytes to `write` in order (tensor, padding, tensor, ...),
    one tensor in memory at a time -> its manifest entry at `offset`. Deterministic: the same source, dtype,
    scheme and code give the same bytes, which is what lets repair() rebuild a unit and check the result
    against the sums recorded at build time. Generic over QuantTensor parts: each is stored as "leaf.part"."""
    tensors, pos, sums, rows, metas = [], 0, _ChunkedSum(), [], {}
    for spec in unit_tensors(source.config, name):
        value = load_unit_tensor(source, spec, dtype, quant, present)
        if value is None:
            continue
        if isinstance(value, QuantTensor):
            metas[spec.leaf] = value.meta()
            parts = {f"{spec.leaf}.{k}": v for k, v in value.parts().items()}
        else:
            parts = {spec.leaf: value}
        for leaf, t in parts.items():
            raw = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # 1-D: bytes
            pad = memoryview(bytes(align_up(len(raw)) - len(raw)))
            for piece in (raw, pad):
                write(piece)
                sums.update(piece)
            tensors.append(StoredTensor(leaf, str(t.dtype).removeprefix("torch."), list(t.shape), pos, len(raw)))
            if name in (EMBED, HEAD) and layout.rows_readable(metas):
                n = spec.shape[0]
                rb = len(raw) // n
                rows = [checksum(raw[r * rb:(r + 1) * rb]) for r in range(n)]
            pos += len(raw) + len(pad)
            del raw
        del value, parts
    return StoredUnit(name, offset, pos, tensors, sums.finish(), rows, metas)


class _Patch:
    """repair()'s sink: gathers a rebuilt extent chunk by chunk, checks each chunk against the manifest's sum
    and only then writes it in place. A chunk that differs is never written (the store keeps its old bytes)."""

    def __init__(self, fd: int, unit: StoredUnit, what: str):
        self.fd, self.unit, self.what = fd, unit, what
        self.buf = bytearray()
        self.at = 0  # bytes of the extent written so far

    def write(self, data: memoryview) -> None:
        data = memoryview(data)
        while len(data):
            take = min(layout.CHUNK_BYTES - len(self.buf), len(data))
            self.buf += data[:take]
            data = data[take:]
            if len(self.buf) == layout.CHUNK_BYTES:
                self._flush()

    def _flush(self) -> None:
        c = self.at // layout.CHUNK_BYTES
        if self.at + len(self.buf) > self.unit.nbytes or checksum(self.buf) != self.unit.chunk_sums[c]:
            raise ChecksumError(f"{self.what}; rebuilt from the source it does not match the store's checksums "
                                "(built by another tierlm version?): delete the offload store to rebuild it")
        view, done = memoryview(self.buf), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.unit.offset + self.at + done)
        del view
        self.at += len(self.buf)
        self.buf.clear()

    def finish(self) -> None:
        if self.buf:
            self._flush()
        if self.at != self.unit.nbytes:
            raise ChecksumError(f"{self.what}; rebuilt from the source it is {self.at} bytes, the store says "
                                f"{self.unit.nbytes}: delete the offload store to rebuild it")


def _fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in `directory` durable (a rename is only on disk once its directory is)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(final: str) -> str:
    """Unique per process and call: two processes building in one directory never share a temp file."""
    return f"{final}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _remove_stale_temps(directory: Path) -> None:
    """Temp files left by a killed build. Only called under the directory lock, when no build is running."""
    for final in (DATA_FILE, MANIFEST):
        for tmp in directory.glob(f"{final}.*tmp"):
            tmp.unlink(missing_ok=True)


def build_store(source: ModelSource, units: list[str], origin: Origin, directory: Path,
                progress: bool | None) -> dict[str, StoredUnit]:
    """Write the store -> its units; called under the directory lock. Order: drop the old manifest and data,
    write the data to a temp file, fsync, rename; then the manifest likewise, last. Invariant: at every instant
    a manifest exists only next to the complete data it describes, so a kill at any moment leaves a store
    that is either whole or rebuilt by the next run. On any failure the temp files are removed."""
    where = f"the offload store in {directory}"
    need = sum(unit_nbytes(source.config, u, origin.dtype, origin.quant) for u in units)
    tmp, mtmp = directory / _temp_name(DATA_FILE), directory / _temp_name(MANIFEST)
    try:
        (directory / MANIFEST).unlink(missing_ok=True)  # the store is untrusted until the manifest is back
        (directory / DATA_FILE).unlink(missing_ok=True)  # garbage now, and its space may be needed
        _remove_stale_temps(directory)
        _fsync_dir(directory)
        free = shutil.disk_usage(directory).free
        if need > free:
            raise StorageError(f"cannot write {where}: not enough free space "
                               f"(needs {format_size(need)}, {format_size(free)} free)")
        stored = _write_data(source, units, origin, tmp, progress)
        os.replace(tmp, directory / DATA_FILE)
        _fsync_dir(directory)  # the data is durably in place before a manifest can name it
        drop_from_page_cache(directory / DATA_FILE)  # written pages must not stay behind as a hidden RAM tier
        with mtmp.open("x") as f:
            f.write(encode_manifest(stored, origin.fingerprint))  # checksummed, bound to the source
            f.flush()
            os.fsync(f.fileno())
        os.replace(mtmp, directory / MANIFEST)
        _fsync_dir(directory)
    except BaseException as e:
        for t in (tmp, mtmp):
            with contextlib.suppress(OSError):
                t.unlink(missing_ok=True)
        if is_storage_error(e):
            note = ""
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                with contextlib.suppress(OSError):
                    note = f"needs {format_size(need)}, {format_size(shutil.disk_usage(directory).free)} free"
            raise storage_error(where, e, note) from None
        raise
    return stored


def _write_data(source: ModelSource, units: list[str], origin: Origin, tmp: Path,
                progress: bool | None) -> dict[str, StoredUnit]:
    present = set(source.tensor_names())
    stored: dict[str, StoredUnit] = {}
    bar = progress_bar(len(units), "writing offload store", progress, unit="unit")
    offset = 0
    try:
        with tmp.open("xb") as f:
            for name in units:
                stored[name] = _encode_unit(source, name, offset, origin.dtype, origin.quant, present, f.write)
                offset += stored[name].nbytes
                bar.update()
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        bar.close()
    return stored


def rewrite_unit(directory: Path, identity: tuple[int, int], name: str, unit: StoredUnit, source: ModelSource,
                 origin: Origin, what: str) -> None:
    """Rebuild unit `name` (manifest entry `unit`) from `source` and write it in place into the data file of
    `directory`, which must still be the file `identity` (st_dev, st_ino) names; under the directory lock, so
    no build replaces the file meanwhile. Raises ChecksumError (bytes differ, file replaced) or StorageError."""
    try:
        with dir_lock(directory):  # no build replaces the file meanwhile
            fd = os.open(directory / DATA_FILE, os.O_WRONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != identity:
                    raise ChecksumError(f"{what}; cannot rebuild it: another process replaced the store "
                                        "(run again)")
                patch = _Patch(fd, unit, what)
                _encode_unit(source, name, unit.offset, origin.dtype, origin.quant, set(source.tensor_names()),
                             patch.write)
                patch.finish()
                os.fsync(fd)
                os.posix_fadvise(fd, unit.offset, unit.nbytes, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except OSError as e:
        if is_storage_error(e):
            raise StorageError(f"{what}; cannot rebuild it in place: {e.strerror}") from None
        raise
