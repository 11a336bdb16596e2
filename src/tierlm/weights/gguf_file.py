"""A minimal GGUF v2/v3 parser: metadata, tensor directory, and memory-mapped tensor bytes.

gguf-py's GGUFReader builds a numpy view per metadata item, which takes ~3 s on a 49k-token vocabulary;
this reads the header with one pass of struct.unpack (~0.1 s). Dequantisation still uses gguf-py.
Every read is bounds-checked so a truncated or corrupt file gives a ModelFormatError, not garbage.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

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
            return [self.value(itype) for _ in range(count)]
        raise ModelFormatError(f"{self.path}: unknown GGUF value type {vtype}")


class GGUFFile:
    """Parsed header + a read-only memory map of the whole file (tensor bytes are sliced lazily)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.map = np.memmap(path, mode="r", dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{path}: cannot map file ({e})") from None
        cur = _Cursor(memoryview(self.map), path)
        if bytes(cur.take(4)) != b"GGUF":
            raise ModelFormatError(f"{path}: not a GGUF file")
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ModelFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > MAX_DIMS:
                raise ModelFormatError(f"{path}: tensor {name} has {n_dims} dims")
            ne = [cur.unpack("<Q") for _ in range(n_dims)]
            raw.append((name, tuple(reversed(ne)), cur.unpack("<I"), cur.unpack("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
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
            if info.offset + nbytes > len(self.map):
                raise ModelFormatError(f"{path}: truncated (tensor {name} ends past the end of the file)")
            self.tensors[name] = info

    def close(self) -> None:
        # Dropping the last reference unmaps the file (numpy has no explicit munmap).
        self.map = None

    def raw(self, info: TensorInfo) -> np.ndarray:
        """Stored bytes as uint8 [*shape[:-1], bytes per row] (what gguf.quants.dequantize expects)."""
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        row_bytes = info.shape[-1] // block * type_size
        return self.map[info.offset:info.offset + info.nbytes].reshape(*info.shape[:-1], row_bytes)
