"""The offload store: units placed off the compute device, written once to `offload_dir` for streaming. This
module is the read side: opening a store (reused when its manifest verifies and matches the source, else built
under `DIR/.lock`), reading and verifying chunks, whole units and on-demand rows, and the tensors of a unit as
views of its bytes. The format is in disk_layout.py, the manifest's checks in disk_manifest.py, the writing
(build and in-place repair) in disk_build.py; the format's public names are re-exported here.
Self-healing: a unit whose bytes fail their checksum twice is rebuilt from the source in place (repair), when
the source is unchanged; the rebuilt bytes must match the manifest's sums, as the same source and the same
code give the same bytes. A missing or changed source is a clear error instead.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from tierlm.config import STORAGE_DTYPES
from tierlm.errors import ModelFormatError, TierlmError, is_storage_error, storage_error
from tierlm.offload import disk_layout as layout
from tierlm.memory.directio import ALIGN, AlignedBuffer, DirectFile, align_up, drop_from_page_cache
from tierlm.memory.dirlock import dir_lock
from tierlm.offload.disk_build import build_store, rewrite_unit
from tierlm.offload.disk_layout import (CHUNK_BYTES, DATA_FILE, MANIFEST, STORE_VERSION, ChecksumError, Origin,
                                          StoredTensor, StoredUnit, checksum, source_fingerprint)
from tierlm.offload.disk_manifest import CorruptManifest, StaleManifest, check_layout, decode_manifest
from tierlm.offload.stats import TierStats
from tierlm.quant import ggml
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import PARTS, QuantTensor
from tierlm.weights import open_model
from tierlm.weights.source import ModelSource

__all__ = ["CHUNK_BYTES", "DATA_FILE", "MANIFEST", "STORE_VERSION", "ChecksumError", "OffloadStore", "StoredTensor",
           "StoredUnit", "checksum", "source_fingerprint"]

log = logging.getLogger("tierlm.offload")


class OffloadStore:
    """Invariant: `units` describe the bytes of `path` as built from `origin`; a unit found corrupt is
    rewritten in place with exactly those bytes (repair) or reported, never trusted."""

    def __init__(self, directory: Path, units: dict[str, StoredUnit], origin: Origin | None = None):
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
        origin = Origin(Path(source.path), source_fingerprint(source, dtype, quant), dtype, quant)
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
            existing = cls._open(source, directory, origin, units)
            if existing is not None:
                return existing
            return cls._build(source, units, origin, directory, progress)

    @classmethod
    def _open(cls, source: ModelSource, directory: Path, origin: Origin,
              units: list[str]) -> "OffloadStore | None":
        """The store in `directory` when its manifest verifies and fits this source (disk_manifest.py) and it
        holds `units`, else None: rebuild. A manifest found corrupt or edited is never used, and its rebuild
        is said in one warning line (another version, source or set of units is an ordinary rebuild)."""
        try:
            raw = (directory / MANIFEST).read_bytes()
            stored, data_bytes = decode_manifest(raw, origin.fingerprint)
            check_layout(stored, source.config, origin.dtype, origin.quant, set(source.tensor_names()))
            data = directory / DATA_FILE
            size = data.stat().st_size if data.is_file() else None
            if size != data_bytes:  # a truncated or replaced data file: its bytes are not the ones described
                raise CorruptManifest(f"{DATA_FILE} is {'missing' if size is None else f'{size} bytes'}, "
                                      f"it says {data_bytes}")
        except (FileNotFoundError, StaleManifest):
            return None  # none yet, or one from another version or source: the build's progress bar says so
        except (OSError, CorruptManifest) as e:
            why = e if isinstance(e, CorruptManifest) else f"it cannot be read ({e})"
            log.warning("the offload store in %s is not used, its %s fails verification: %s; rebuilding "
                        "it from the source", directory, MANIFEST, why)
            return None
        if not set(units) <= set(stored):
            return None
        return cls(directory, stored, origin)

    @classmethod
    def _build(cls, source: ModelSource, units: list[str], origin: Origin, directory: Path,
               progress: bool | None) -> "OffloadStore":
        """Write the store (disk_build.build_store); called under the directory lock."""
        return cls(directory, build_store(source, units, origin, directory, progress), origin)

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
                rewrite_unit(self.directory, self._identity, unit, self.units[unit], source, o, what)
            finally:
                source.close()
                for f in source.files():
                    with contextlib.suppress(OSError):
                        drop_from_page_cache(f)  # the source is no hidden tier either

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
        if checksum(buf[at:at + n]) != s.chunk_sums[at // layout.CHUNK_BYTES]:
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
        re-read once on a mismatch, then the unit repaired from the source) -> [len(ids), H], in the stored
        dtype, or fp32 dequantised from GGUF blocks (as quant/kernels.embedding_rows dequantises resident ones).
        `buf` must hold row_buffer_bytes()."""
        stats = stats if stats is not None else TierStats()
        s = self.units[unit]
        t = s.tensors[0]
        row_bytes = s.matrix_rows()[1]
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
        if s.quant:  # GGUF blocks (layout.rows_readable: one run of one type)
            (meta,) = s.quant.values()
            (qtype, _), k = meta["runs"][0], meta["shape"][1]
            return ggml.dequantize_rows(out.reshape(-1), ((qtype, len(ids)),), k, np.arange(len(ids)))
        return out.view(STORAGE_DTYPES[t.dtype]).view(len(ids), t.shape[1])

    def row_buffer_bytes(self, unit: str) -> int:
        return align_up(self.units[unit].matrix_rows()[1]) + ALIGN
