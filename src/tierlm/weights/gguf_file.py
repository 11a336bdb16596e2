"""A minimal GGUF v2/v3 parser: metadata, tensor directory, and tensor bytes read in row pieces.

gguf-py's GGUFReader builds a numpy view per metadata item, which takes ~3 s on a 49k-token vocabulary;
this reads the header with one pass of struct.unpack (~0.1 s). Dequantisation still uses gguf-py.
Every read is bounds-checked so a truncated or corrupt file gives a ModelFormatError, not garbage.

Tensor bytes are read with pread into fresh memory and their pages dropped from the page cache, never through
a memory map: mapped pages count in RSS while mapped (a 3.8 GB file read through a map cost 3.8 GB of RSS on
top of the weights built from it) and would stay behind as a hidden RAM tier under a budget. The header is
parsed from a map that is dropped at once.
"""
from __future__ import annotations

import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from tierlm.errors import ModelFormatError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                 11: "<i8", 12: "<f8"}
MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first), i.e. GGUF's ne reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ModelFormatError(f"{self.path}: truncated GGUF header")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{self.path}: corrupt GGUF string") from None

    def strings(self, count: int) -> list[str]:
        """An array of `count` strings in one loop over local names: a vocabulary's 262k tokens through
        string() cost ~1 s of method calls, here ~0.1 s. Same checks: truncation and UTF-8."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                if pos + 8 > end:
                    raise ModelFormatError(f"{self.path}: truncated GGUF header")
                n = length(buf, pos)[0]
                pos += 8
                if pos + n > end:
                    raise ModelFormatError(f"{self.path}: truncated GGUF header")
                out.append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError:
            raise ModelFormatError(f"{self.path}: corrupt GGUF string") from None
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _ARRAY_DTYPES:
                dt = np.dtype(_ARRAY_DTYPES[itype])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            if itype == _STRING:
                return self.strings(count)
            return [self.value(itype) for _ in range(count)]
        raise ModelFormatError(f"{self.path}: unknown GGUF value type {vtype}")


class GGUFFile:
    """Parsed header + an open file descriptor; tensor bytes are read on demand, row pieces at a time."""

    def __init__(self, path: Path):
        self.path = path
        try:
            header = np.memmap(path, mode="r", dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{path}: cannot map file ({e})") from None
        try:
            self._parse(header, path)
        finally:
            del header  # unmapped here: only the header's pages were touched
        self._fd: int | None = os.open(path, os.O_RDONLY)
        # close() is the owner's call; the finalizer is the backstop for a load that failed half-way (an LLM
        # whose constructor raised never closes its source), so no descriptor outlives this object
        self._closer = weakref.finalize(self, os.close, self._fd)
        # NOTE: no readahead: pages the kernel reads ahead are still in flight when a piece's range is dropped,
        # and stay cached (measured: 3.4 of 4.0 GB of a 7B file left in the page cache after a resident load).
        # Pieces are megabytes, so reading them without readahead costs nothing.
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            pass
        drop_pages(self._fd, 0, 0)  # the header's pages, and what the map's fault-around read beyond them

    def _parse(self, header: np.memmap, path: Path) -> None:
        cur = _Cursor(memoryview(header), path)
        if bytes(cur.take(4)) != b"GGUF":
            raise ModelFormatError(f"{path}: not a GGUF file")
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ModelFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        # (type, array item type) per key, so metadata can be copied into another GGUF exactly: llama.cpp
        # rejects e.g. a token id stored as int32 where it expects uint32.
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            start = cur.pos
            self.metadata[key] = cur.value(vtype)
            item = struct.unpack_from("<I", cur.buf, start)[0] if vtype == _ARRAY else None
            try:  # (an empty array's item type was never checked by value())
                self.value_types[key] = (GGUFValueType(vtype), None if item is None else GGUFValueType(item))
            except ValueError:
                raise ModelFormatError(f"{path}: unknown GGUF value type {item}") from None
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > MAX_DIMS:
                raise ModelFormatError(f"{path}: tensor {name} has {n_dims} dims")
            ne = [cur.unpack("<Q") for _ in range(n_dims)]
            raw.append((name, tuple(reversed(ne)), cur.unpack("<I"), cur.unpack("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = self.data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qt, rel in raw:
            try:
                qtype = GGMLQuantizationType(qt)
            except ValueError:
                raise ModelFormatError(f"{path}: tensor {name} has unknown type id {qt}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise ModelFormatError(f"{path}: tensor {name} row of {shape[-1]} is not a multiple of {block}")
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size
            info = TensorInfo(name, shape, qtype, data_start + rel, nbytes)
            if info.offset + nbytes > len(header):
                raise ModelFormatError(f"{path}: truncated (tensor {name} ends past the end of the file)")
            self.tensors[name] = info

    def close(self) -> None:
        self._closer()  # closes the descriptor once, however often close() is called
        self._fd = None

    def rows(self, info: TensorInfo) -> int:
        """Rows of the tensor as raw() pieces count them (all dims but the last)."""
        return int(np.prod(info.shape[:-1], dtype=np.int64))

    def raw(self, info: TensorInfo, rows: slice = slice(None)) -> np.ndarray:
        """Stored bytes of rows `rows` (of the tensor flattened to 2-D) as uint8 [R, bytes per row] in fresh
        memory (what gguf.quants.dequantize expects, reshaped to the tensor's shape for a whole tensor).
        Read with pread; the pages are dropped from the page cache afterwards."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        row_bytes = info.shape[-1] // block * type_size
        start, stop, _ = rows.indices(self.rows(info))
        n = max(0, stop - start)
        out = np.empty((n, row_bytes), dtype=np.uint8)
        at, want = info.offset + start * row_bytes, n * row_bytes
        view, done = memoryview(out).cast("B"), 0
        while done < want:
            got = os.preadv(self._fd, [view[done:]], at + done)
            if got <= 0:
                raise ModelFormatError(f"{self.path}: truncated (tensor {info.name})")
            done += got
        drop_pages(self._fd, at, want)
        return out if rows != slice(None) else out.reshape(*info.shape[:-1], row_bytes)


def drop_pages(fd: int, offset: int, length: int) -> None:
    """Evict a range of a file we only read once from the page cache (it is not a tier tierlm accounts)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:  # advisory: a filesystem that refuses it just keeps the pages
        pass
