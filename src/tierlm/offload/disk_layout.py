"""The offload store's on-disk format: file names, version, chunk size, the manifest's records, the checksum and
the source fingerprint. Shared by the read side (disk_store.py) and the write side (disk_build.py).

Layout of `layers.bin`: each unit's tensors are contiguous and every tensor starts 4 KiB-aligned, so one
unit is one aligned extent read with O_DIRECT into a ring slot, and tensors are views of the slot.
Integrity: an XXH3-64 hash per CHUNK_BYTES piece of each extent (the streamer reads in chunks and checks each
as it lands, on the I/O threads). XXH3 rather than zlib's CRC32 because CRC32 runs at ~2.7 GB/s per core: at
disk speed it would take most of a core on a 2-core machine away from compute; XXH3 runs at 10-25 GB/s.
`manifest.json` records shapes, dtypes, offsets, checksums and a fingerprint of the source, and a checksum
of its own bound to that fingerprint (disk_manifest.py); it is written last, atomically (temp + rename), so
a store without a manifest is incomplete and is rebuilt. A store whose manifest verifies, matches the
source and holds the units asked for is reused; any other is rebuilt.
NOTE: other modules read CHUNK_BYTES as `disk_layout.CHUNK_BYTES` (not a copy), so one setting of it
(tests make it small) holds for building, reading and checking alike.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from tierlm.errors import ModelFormatError
from tierlm.quant import int4
from tierlm.quant.scheme import QuantScheme
from tierlm.weights.source import ModelSource

STORE_VERSION = 7  # 5: quantised matrices stored in kernel form (see quant/tensor.py); 6: checksummed manifest;
# 7: an embedding or head in GGUF blocks keeps them on disk, with a checksum per row (rows read from their blocks)
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
    # An embed/head matrix stored dense or in GGUF blocks: XXH3-64 of each row (on-demand rows; rows_readable)
    row_sums: list[int] = field(default_factory=list)
    quant: dict[str, dict] = field(default_factory=dict)  # leaf -> QuantTensor.meta(); its parts are "leaf.part"

    def matrix_rows(self) -> tuple[int, int]:
        """(rows, bytes per row) of the unit's first matrix: a dense [V, H] tensor, or GGUF blocks (1-D bytes, one
        run: every row the same size)."""
        t = self.tensors[0]
        rows = next(iter(self.quant.values()))["shape"][0] if self.quant else t.shape[0]
        return rows, t.nbytes // rows

    def chunks(self) -> list[tuple[int, int]]:
        """(offset within the extent, length) of every checksummed chunk."""
        return [(c, min(CHUNK_BYTES, self.nbytes - c)) for c in range(0, self.nbytes, CHUNK_BYTES)]


def rows_readable(metas: dict[str, dict]) -> bool:
    """Whether an embed/head unit with these quantisation metadata serves rows on demand: dense, or one matrix in
    GGUF blocks of one type (a row is whole blocks); not a requantised kernel form (int4/int8 packed layouts)."""
    return not metas or (len(metas) == 1 and all(m["kind"] == "ggml" and len(m["runs"]) == 1 for m in metas.values()))


@dataclass(frozen=True)
class Origin:
    """What rebuilding a unit needs. The source is reopened lazily: WeightStore closes it after loading."""
    path: Path  # as open_model takes it: a GGUF file or a Hugging Face directory
    fingerprint: str  # source_fingerprint at build time: a rebuild is only trusted from the same source
    dtype: torch.dtype
    quant: QuantScheme


def source_fingerprint(source: ModelSource, dtype: torch.dtype, quant: QuantScheme = QuantScheme()) -> str:
    """Identity of what the store was built from: path, size and mtime of every model file, the dtype and the
    quant scheme. Cheap (no full-file hash) yet changes when any file is replaced or edited."""
    files = source.files()
    # the int4 byte layout follows this torch build's vector width: a store from another CPU is rebuilt
    layout = int4.layout_tag() if quant.enabled else ""
    h = hashlib.sha256(f"v{STORE_VERSION}|{dtype}|{quant}|{layout}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def checksum(data: bytes | memoryview) -> int:
    """The store's checksum (XXH3-64); releases the GIL, so I/O threads verify in parallel."""
    return xxhash.xxh3_64_intdigest(data)
