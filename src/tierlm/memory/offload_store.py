"""The offload store: units placed off the compute device, written once to `offload_dir` for streaming.

Layout of `layers.bin`: each unit's tensors are contiguous and every tensor starts 4 KiB-aligned, so one
unit is one aligned extent read with O_DIRECT into a ring slot, and tensors are views of the slot.
Integrity: an XXH3-64 hash per CHUNK_BYTES piece of each extent (the streamer reads in chunks and checks each
as it lands, on the I/O threads). XXH3 rather than zlib's CRC32 because CRC32 runs at ~2.7 GB/s per core: at
disk speed it would take most of a core on a 2-core machine away from compute; XXH3 runs at 10-25 GB/s. `manifest.json` records shapes, dtypes, offsets, checksums and a fingerprint of
the source; it is written last, atomically (temp + rename), so a store without a manifest is incomplete
and is rebuilt. A store whose fingerprint and unit list match is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import xxhash

from tierlm.config import STORAGE_DTYPES
from tierlm.errors import ModelFormatError
from tierlm.memory.directio import ALIGN, AlignedBuffer, DirectFile, align_up, drop_from_page_cache
from tierlm.memory.units import EMBED, HEAD, unit_tensors
from tierlm.progress import progress_bar
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import PARTS, QuantTensor
from tierlm.weights.source import ModelSource
from tierlm.weights.unit_load import load_unit_tensor

STORE_VERSION = 4
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
    h = hashlib.sha256(f"v{STORE_VERSION}|{dtype}|{quant}".encode())
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


class OffloadStore:
    def __init__(self, directory: Path, units: dict[str, StoredUnit]):
        self.directory = directory
        self.units = units

    @property
    def path(self) -> Path:
        return self.directory / DATA_FILE

    @classmethod
    def open_or_build(cls, source: ModelSource, units: list[str], dtype: torch.dtype, directory: Path,
                      progress: bool | None = None, quant: QuantScheme = QuantScheme()) -> "OffloadStore":
        fingerprint = source_fingerprint(source, dtype, quant)
        existing = cls._open(directory, fingerprint, units)
        if existing is not None:
            return existing
        return cls._build(source, units, dtype, quant, directory, fingerprint, progress)

    @classmethod
    def _open(cls, directory: Path, fingerprint: str, units: list[str]) -> "OffloadStore | None":
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            if manifest.get("version") != STORE_VERSION or manifest.get("fingerprint") != fingerprint:
                return None
            stored = {k: StoredUnit(**{**v, "tensors": [StoredTensor(**t) for t in v["tensors"]]})
                      for k, v in manifest["units"].items()}
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        data = directory / DATA_FILE
        if sorted(stored) != sorted(units) or not data.is_file() or data.stat().st_size != manifest["data_bytes"]:
            return None
        return cls(directory, stored)

    @classmethod
    def _build(cls, source: ModelSource, units: list[str], dtype: torch.dtype, quant: QuantScheme,
               directory: Path, fingerprint: str, progress: bool | None) -> "OffloadStore":
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)  # the store is incomplete until the manifest is back
        present = set(source.tensor_names())
        stored: dict[str, StoredUnit] = {}
        tmp = directory / (DATA_FILE + ".tmp")
        bar = progress_bar(len(units), "writing offload store", progress, unit="unit")
        offset = 0
        with tmp.open("wb") as f:
            for name in units:
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
                        pad = bytes(align_up(len(raw)) - len(raw))
                        for piece in (raw, pad):
                            f.write(piece)
                            sums.update(piece)
                        tensors.append(StoredTensor(leaf, str(t.dtype).removeprefix("torch."), list(t.shape), pos,
                                                    len(raw)))
                        if name in (EMBED, HEAD) and not metas:
                            rb = len(raw) // t.shape[0]
                            rows = [checksum(raw[r * rb:(r + 1) * rb]) for r in range(t.shape[0])]
                        pos += len(raw) + len(pad)
                        del raw
                    del value, parts
                stored[name] = StoredUnit(name, offset, pos, tensors, sums.finish(), rows, metas)
                offset += pos
                bar.update()
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        bar.close()
        os.replace(tmp, directory / DATA_FILE)
        drop_from_page_cache(directory / DATA_FILE)  # written pages must not stay behind as a hidden RAM tier
        manifest = {"version": STORE_VERSION, "fingerprint": fingerprint, "data_bytes": offset,
                    "chunk_bytes": CHUNK_BYTES, "units": {k: asdict(s) for k, s in stored.items()}}
        mtmp = directory / (MANIFEST + ".tmp")
        mtmp.write_text(json.dumps(manifest))
        os.replace(mtmp, directory / MANIFEST)
        return cls(directory, stored)

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

    def read_unit(self, reader: DirectFile, unit: str, buf: AlignedBuffer) -> dict[str, torch.Tensor]:
        """Read and verify a whole unit into `buf` (synchronously); tensors are views of `buf`."""
        s = self.units[unit]
        if buf.nbytes < s.nbytes:
            raise ValueError(f"buffer of {buf.nbytes} B cannot hold {unit} ({s.nbytes} B)")
        for chunk in s.chunks():
            self.read_chunk(reader, unit, chunk, buf.view)
        return self.views(unit, buf.tensor())

    def read_rows(self, reader: DirectFile, unit: str, ids: list[int], buf: AlignedBuffer) -> torch.Tensor:
        """Rows `ids` of the embed/head matrix of `unit`, read on demand (each verified against its checksum and
        re-read once on a mismatch) -> [len(ids), H]. `buf` must hold row_buffer_bytes()."""
        s = self.units[unit]
        t = s.tensors[0]
        row_bytes = t.nbytes // t.shape[0]
        out = torch.empty(len(ids), row_bytes, dtype=torch.uint8)
        for k, r in enumerate(ids):
            at = s.offset + t.offset + r * row_bytes
            start = at - at % ALIGN
            for attempt in (0, 1):
                got = reader.read_into(buf.view, start, align_up(at + row_bytes) - start)
                row = buf.view[at - start:at - start + row_bytes]
                if got >= at - start + row_bytes and checksum(row) == s.row_sums[r]:
                    break
                if attempt:
                    raise ChecksumError(f"{self.path}: row {r} of {unit} is corrupt (after one re-read)")
            out[k] = torch.frombuffer(row, dtype=torch.uint8)
        return out.view(STORAGE_DTYPES[t.dtype]).view(len(ids), t.shape[1])

    def row_buffer_bytes(self, unit: str) -> int:
        t = self.units[unit].tensors[0]
        return align_up(t.nbytes // t.shape[0]) + ALIGN
