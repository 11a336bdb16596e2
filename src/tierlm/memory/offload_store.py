"""The offload store: units placed off the compute device, written once to `offload_dir` for streaming.

Layout of `layers.bin`: each unit's tensors are contiguous and every tensor starts 4 KiB-aligned, so one
unit is one aligned extent read with O_DIRECT into a ring slot, and tensors are views of the slot.
Integrity: an XXH3-64 hash per CHUNK_BYTES piece of each extent (the streamer reads in chunks and checks each
as it lands, on the I/O threads). XXH3 rather than zlib's CRC32 because CRC32 runs at ~2.7 GB/s per core: at
disk speed it would take most of a core on a 2-core machine away from compute; XXH3 runs at 10-25 GB/s. `manifest.json` records shapes, dtypes, offsets, checksums and a fingerprint of
the source; it is written last, atomically (temp + rename), so a store without a manifest is incomplete
and is rebuilt. A store whose fingerprint and unit list match is reused. Builds hold `DIR/.lock`, so two
processes never write one store at once.
Self-healing: a unit whose bytes fail their checksum twice is rebuilt from the source in place (repair), when
the source is unchanged; the rebuilt bytes must match the manifest's sums, as the same source and the same
code give the same bytes. A missing or changed source is a clear error instead.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import xxhash

from tierlm.config import STORAGE_DTYPES, format_size
from tierlm.errors import ModelFormatError, StorageError, TierlmError, is_storage_error, storage_error
from tierlm.memory.directio import ALIGN, AlignedBuffer, DirectFile, align_up, drop_from_page_cache
from tierlm.memory.dirlock import dir_lock
from tierlm.memory.stats import TierStats
from tierlm.memory.units import EMBED, HEAD, unit_nbytes, unit_tensors
from tierlm.progress import progress_bar
from tierlm.quant import kernels
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import PARTS, QuantTensor
from tierlm.weights import open_model
from tierlm.weights.source import ModelSource
from tierlm.weights.unit_load import load_unit_tensor

STORE_VERSION = 5  # 5: quantised matrices stored in kernel form (see quant/tensor.py)
DATA_FILE, MANIFEST = "layers.bin", "manifest.json"
CHUNK_BYTES = 8 << 20  # read and checksum granule: ≥4 MiB keeps the disk at full speed


class ChecksumError(ModelFormatError):
    """Stored bytes do not match their checksum (disk corruption or a torn write)."""


@dataclass(frozen=True)
class StoredTensor:
    name: str  # leaf name inside the unit: "wq", "w_down", "lm_head", ...
    dtype: str
    shape: list[int]
    offset: int  # from the start of the unit's extent; multiple of ALIGN
    nbytes: int


@dataclass(frozen=True)
class StoredUnit:
    name: str  # "layers.3", "head", "embed"
    offset: int  # in layers.bin; multiple of ALIGN
    nbytes: int  # extent, multiple of ALIGN
    tensors: list[StoredTensor]
    chunk_sums: list[int]  # XXH3-64 of extent[c*CHUNK_BYTES : (c+1)*CHUNK_BYTES]
    row_sums: list[int] = field(default_factory=list)  # dense embed/head: XXH3-64 of each row (on-demand rows)
    quant: dict[str, dict] = field(default_factory=dict)  # leaf -> QuantTensor.meta(); its parts are "leaf.part"

    def chunks(self) -> list[tuple[int, int]]:
        """(offset within the extent, length) of every checksummed chunk."""
        return [(c, min(CHUNK_BYTES, self.nbytes - c)) for c in range(0, self.nbytes, CHUNK_BYTES)]


def source_fingerprint(source: ModelSource, dtype: torch.dtype, quant: QuantScheme = QuantScheme()) -> str:
    """Identity of what the store was built from: path, size and mtime of every model file, the dtype and the
    quant scheme. Cheap (no full-file hash) yet changes when any file is replaced or edited."""
    files = source.files()
    # the int4 byte layout follows this torch build's vector width: a store from another CPU is rebuilt
    layout = kernels.layout_tag() if quant.enabled else ""
    h = hashlib.sha256(f"v{STORE_VERSION}|{dtype}|{quant}|{layout}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def checksum(data: bytes | memoryview) -> int:
    """The store's checksum (XXH3-64); releases the GIL, so I/O threads verify in parallel."""
    return xxhash.xxh3_64_intdigest(data)


class _ChunkedSum:
    """checksum() per CHUNK_BYTES of a byte stream, fed in arbitrary pieces."""

    def __init__(self) -> None:
        self.sums: list[int] = []
        self._h, self._filled = xxhash.xxh3_64(), 0

    def update(self, data: bytes | memoryview) -> None:
        data = memoryview(data)
        while len(data):
            take = min(CHUNK_BYTES - self._filled, len(data))
            self._h.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == CHUNK_BYTES:
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
            if name in (EMBED, HEAD) and not metas:
                rb = len(raw) // t.shape[0]
                rows = [checksum(raw[r * rb:(r + 1) * rb]) for r in range(t.shape[0])]
            pos += len(raw) + len(pad)
            del raw
        del value, parts
    return StoredUnit(name, offset, pos, tensors, sums.finish(), rows, metas)


@dataclass(frozen=True)
class _Origin:
    """What rebuilding a unit needs. The source is reopened lazily: WeightStore closes it after loading."""
    path: Path  # as open_model takes it: a GGUF file or a Hugging Face directory
    fingerprint: str  # source_fingerprint at build time: a rebuild is only trusted from the same source
    dtype: torch.dtype
    quant: QuantScheme


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
            take = min(CHUNK_BYTES - len(self.buf), len(data))
            self.buf += data[:take]
            data = data[take:]
            if len(self.buf) == CHUNK_BYTES:
                self._flush()

    def _flush(self) -> None:
        c = self.at // CHUNK_BYTES
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


class OffloadStore:
    """Invariant: `units` describe the bytes of `path` as built from `origin`; a unit found corrupt is
    rewritten in place with exactly those bytes (repair) or reported, never trusted."""

    def __init__(self, directory: Path, units: dict[str, StoredUnit], origin: _Origin | None = None):
        self.directory = directory
        self.units = units
        self.origin = origin  # None: nothing to rebuild from (a corrupt unit is an error)
        st = self.path.stat()
        self._identity = (st.st_dev, st.st_ino)  # the data file this manifest describes (repair checks it)
        self._repair_lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.directory / DATA_FILE

    @classmethod
    def open_or_build(cls, source: ModelSource, units: list[str], dtype: torch.dtype, directory: Path,
                      progress: bool | None = None, quant: QuantScheme = QuantScheme()) -> "OffloadStore":
        origin = _Origin(Path(source.path), source_fingerprint(source, dtype, quant), dtype, quant)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if is_storage_error(e):
                raise storage_error(f"the offload store in {directory}", e) from None
            raise
        note = None if progress is False else \
            f"tierlm: waiting for another process writing the offload store in {directory}"
        # Under the lock: a store another process is writing is never read half-done, and a process that
        # waited finds the store built and reuses it.
        with dir_lock(directory, note):
            existing = cls._open(directory, origin, units)
            if existing is not None:
                return existing
            return cls._build(source, units, origin, directory, progress)

    @classmethod
    def _open(cls, directory: Path, origin: _Origin, units: list[str]) -> "OffloadStore | None":
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            if (manifest.get("version") != STORE_VERSION or manifest.get("fingerprint") != origin.fingerprint
                    or manifest.get("chunk_bytes") != CHUNK_BYTES):
                return None
            stored = {k: StoredUnit(**{**v, "tensors": [StoredTensor(**t) for t in v["tensors"]]})
                      for k, v in manifest["units"].items()}
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        data = directory / DATA_FILE
        if sorted(stored) != sorted(units) or not data.is_file() or data.stat().st_size != manifest["data_bytes"]:
            return None
        return cls(directory, stored, origin)

    @classmethod
    def _build(cls, source: ModelSource, units: list[str], origin: _Origin, directory: Path,
               progress: bool | None) -> "OffloadStore":
        """Write the store; called under the directory lock. Order: drop the old manifest and data, write the
        data to a temp file, fsync, rename; then the manifest likewise, last. Invariant: at every instant a
        manifest exists only next to the complete data it describes, so a kill at any moment leaves a store
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
            stored = cls._write_data(source, units, origin, tmp, progress)
            os.replace(tmp, directory / DATA_FILE)
            _fsync_dir(directory)  # the data is durably in place before a manifest can name it
            drop_from_page_cache(directory / DATA_FILE)  # written pages must not stay behind as a hidden RAM tier
            manifest = {"version": STORE_VERSION, "fingerprint": origin.fingerprint,
                        "data_bytes": sum(s.nbytes for s in stored.values()), "chunk_bytes": CHUNK_BYTES,
                        "units": {k: asdict(s) for k, s in stored.items()}}
            with mtmp.open("x") as f:
                f.write(json.dumps(manifest))
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
        return cls(directory, stored, origin)

    @staticmethod
    def _write_data(source: ModelSource, units: list[str], origin: _Origin, tmp: Path,
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

    # --- self-healing ----------------------------------------------------------------------------
    def repair(self, unit: str, what: str) -> None:
        """Rebuild `unit` in place from the source, after its bytes on disk failed twice (`what` says how).
        Only the same source (fingerprint unchanged) is trusted, and the rebuilt bytes must equal the
        manifest's sums chunk by chunk before they are written (pwrite + fsync, then dropped from the page
        cache). Raises ChecksumError, one line, when the source is missing or changed, or the bytes differ.
        NOTE: holds one unit's tensors in RAM for a moment (as the build did), outside the memory plan."""
        o = self.origin
        if o is None:
            raise ChecksumError(f"{what}; no source to rebuild it from")
        with self._repair_lock:
            try:
                source = open_model(o.path)
            except (TierlmError, OSError) as e:
                raise ChecksumError(f"{what}; cannot rebuild it: the source cannot be opened ({e})") from None
            try:
                try:
                    same = source_fingerprint(source, o.dtype, o.quant) == o.fingerprint
                except OSError:
                    same = False  # a file of the source vanished
                if not same:
                    raise ChecksumError(f"{what}; cannot rebuild it: the source {o.path} changed since the store "
                                        "was built (run again to rebuild the store)")
                self._rewrite(source, unit, what)
            finally:
                source.close()
                for f in source.files():
                    with contextlib.suppress(OSError):
                        drop_from_page_cache(f)  # the source is no hidden tier either

    def _rewrite(self, source: ModelSource, unit: str, what: str) -> None:
        s, o = self.units[unit], self.origin
        try:
            with dir_lock(self.directory):  # no build replaces the file meanwhile
                fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) != self._identity:
                        raise ChecksumError(f"{what}; cannot rebuild it: another process replaced the store "
                                            "(run again)")
                    patch = _Patch(fd, s, what)
                    _encode_unit(source, unit, s.offset, o.dtype, o.quant, set(source.tensor_names()), patch.write)
                    patch.finish()
                    os.fsync(fd)
                    os.posix_fadvise(fd, s.offset, s.nbytes, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        except OSError as e:
            if is_storage_error(e):
                raise StorageError(f"{what}; cannot rebuild it in place: {e.strerror}") from None
            raise

    def _failure(self, unit: str, e: Exception) -> str:
        """One line for a read that failed twice."""
        if isinstance(e, ModelFormatError):
            return f"{e} (after one re-read)"
        return f"{self.path}: read error in {unit}: {e} (after one re-read)"

    def reread_or_repair(self, reader: DirectFile, unit: str, chunks: list[tuple[int, int]], buf: memoryview,
                         stats: TierStats | None = None) -> None:
        """Chunks of `unit` whose first read into `buf` failed: each is re-read once (a transient error); those
        failing again mean the bytes on disk are bad, so the unit is rebuilt from the source and they are
        read a last time. Raises one clear line when that cannot be done."""
        stats = stats if stats is not None else TierStats()
        bad: list[tuple[int, int]] = []
        why = ""  # NOTE: a message, not the exception: its traceback would pin `buf` (a frame cycle)
        for chunk in chunks:
            stats.retries += 1
            try:
                self.read_chunk(reader, unit, chunk, buf)
            except (OSError, ModelFormatError) as e:
                bad.append(chunk)
                why = self._failure(unit, e)
        if not bad:
            return
        self.repair(unit, why)
        stats.repairs += 1
        for chunk in bad:
            try:
                self.read_chunk(reader, unit, chunk, buf)
            except (OSError, ModelFormatError) as e:
                raise ChecksumError(f"{self.path}: {unit} still fails after it was rebuilt from the source ({e}); "
                                    "is the disk failing?") from None

    def max_unit_bytes(self, names: list[str] | None = None) -> int:
        """The largest extent among `names` (default all): what one ring slot must hold."""
        return max((self.units[n].nbytes for n in (names or self.units)), default=0)

    def open_reader(self, direct: bool = True) -> DirectFile:
        return DirectFile(self.path, direct=direct)

    def read_chunk(self, reader: DirectFile, unit: str, chunk: tuple[int, int], buf: memoryview) -> None:
        """Read one chunk of `unit` into buf[chunk offset:] and verify its checksum (raises on a short read or a
        mismatch). Thread-safe: preadv and the hash release the GIL and touch disjoint bytes."""
        s = self.units[unit]
        at, n = chunk
        if reader.read_into(buf[at:at + n], s.offset + at, n) != n:
            raise ModelFormatError(f"{self.path}: short read in {unit} (file truncated?)")
        if checksum(buf[at:at + n]) != s.chunk_sums[at // CHUNK_BYTES]:
            raise ChecksumError(f"{self.path}: checksum mismatch in {unit} bytes {at}..{at + n}")

    def views(self, unit: str, buf: torch.Tensor) -> dict[str, torch.Tensor | QuantTensor]:
        """Tensors of `unit` as views of `buf` (uint8, on any device), which holds the unit's extent; quantised
        matrices are reassembled from their parts.
        NOTE: the views are valid only while `buf` holds this unit (until the ring reuses the slot)."""
        s = self.units[unit]
        flat: dict[str, torch.Tensor] = {}
        for t in s.tensors:
            flat[t.name] = buf[t.offset:t.offset + t.nbytes].view(STORAGE_DTYPES[t.dtype]).view(t.shape)
        out: dict[str, torch.Tensor | QuantTensor] = {k: v for k, v in flat.items() if "." not in k}
        for leaf, meta in s.quant.items():
            out[leaf] = QuantTensor.from_parts(meta, {p: flat[f"{leaf}.{p}"] for p in PARTS if f"{leaf}.{p}" in flat})
        return out

    def read_unit(self, reader: DirectFile, unit: str, buf: AlignedBuffer,
                  stats: TierStats | None = None) -> dict[str, torch.Tensor]:
        """Read and verify a whole unit into `buf` (synchronously, repaired as in reread_or_repair); tensors are
        views of `buf`."""
        s = self.units[unit]
        if buf.nbytes < s.nbytes:
            raise ValueError(f"buffer of {buf.nbytes} B cannot hold {unit} ({s.nbytes} B)")
        failed = []
        for chunk in s.chunks():
            try:
                self.read_chunk(reader, unit, chunk, buf.view)
            except (OSError, ModelFormatError):
                failed.append(chunk)
        if failed:
            self.reread_or_repair(reader, unit, failed, buf.view, stats)
        return self.views(unit, buf.tensor())

    def read_rows(self, reader: DirectFile, unit: str, ids: list[int], buf: AlignedBuffer,
                  stats: TierStats | None = None) -> torch.Tensor:
        """Rows `ids` of the embed/head matrix of `unit`, read on demand (each verified against its checksum,
        re-read once on a mismatch, then the unit repaired from the source) -> [len(ids), H]. `buf` must hold
        row_buffer_bytes()."""
        stats = stats if stats is not None else TierStats()
        s = self.units[unit]
        t = s.tensors[0]
        row_bytes = t.nbytes // t.shape[0]
        out = torch.empty(len(ids), row_bytes, dtype=torch.uint8)
        for k, r in enumerate(ids):
            at = s.offset + t.offset + r * row_bytes
            start = at - at % ALIGN
            for attempt in (0, 1, 2):
                got = reader.read_into(buf.view, start, align_up(at + row_bytes) - start)
                row = buf.view[at - start:at - start + row_bytes]
                if got >= at - start + row_bytes and checksum(row) == s.row_sums[r]:
                    break
                what = f"{self.path}: row {r} of {unit} is corrupt"
                if attempt == 1:  # failed twice: bad bytes on disk
                    self.repair(unit, f"{what} (after one re-read)")
                    stats.repairs += 1
                elif attempt == 2:
                    raise ChecksumError(f"{what}, even after it was rebuilt from the source (is the disk failing?)")
                else:
                    stats.retries += 1
            out[k] = torch.frombuffer(row, dtype=torch.uint8)
        return out.view(STORAGE_DTYPES[t.dtype]).view(len(ids), t.shape[1])

    def row_buffer_bytes(self, unit: str) -> int:
        t = self.units[unit].tensors[0]
        return align_up(t.nbytes // t.shape[0]) + ALIGN
