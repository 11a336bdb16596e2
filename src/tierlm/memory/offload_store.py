"""The offload store: layers placed on DISK, written once to `offload_dir` in a layout made for streaming.

Layout of `layers.bin`: each layer's tensors are contiguous, every tensor starts 4 KiB-aligned, so one
layer is one aligned O_DIRECT read into a ring buffer. `manifest.json` records shapes, dtypes, offsets,
a CRC32 per tensor and a fingerprint of the source; it is written last, atomically (temp + rename), so a
store without a manifest is incomplete and is rebuilt. A store whose fingerprint matches is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tierlm.config import STORAGE_DTYPES
from tierlm.errors import ModelFormatError
from tierlm.memory.directio import AlignedBuffer, DirectFile, align_up, drop_from_page_cache
from tierlm.progress import progress_bar
from tierlm.weights.names import LAYER_TENSORS, layer_name
from tierlm.weights.source import ModelSource

STORE_VERSION = 1
DATA_FILE, MANIFEST = "layers.bin", "manifest.json"


class ChecksumError(ModelFormatError):
    """Stored bytes do not match their checksum (disk corruption or a torn write)."""


@dataclass(frozen=True)
class StoredTensor:
    name: str  # leaf name inside the layer: "wq", "w_down", ...
    dtype: str
    shape: list[int]
    offset: int  # from the start of the layer's extent; multiple of ALIGN
    nbytes: int
    crc32: int


@dataclass(frozen=True)
class StoredLayer:
    layer: int
    offset: int  # in layers.bin; multiple of ALIGN
    nbytes: int  # extent, multiple of ALIGN
    tensors: list[StoredTensor]


def source_fingerprint(source: ModelSource, dtype: torch.dtype) -> str:
    """Identity of what the store was built from: path, size and mtime of every model file, and the dtype.
    Cheap (no full-file hash) yet changes when any file is replaced or edited."""
    files = [source.path] if source.path.is_file() else sorted(source.path.glob("*.safetensors"))
    h = hashlib.sha256(f"v{STORE_VERSION}|{dtype}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


class OffloadStore:
    def __init__(self, directory: Path, layers: dict[int, StoredLayer]):
        self.directory = directory
        self.layers = layers

    @property
    def max_layer_bytes(self) -> int:
        """Size of the largest layer extent: what one ring buffer must hold."""
        return max((s.nbytes for s in self.layers.values()), default=0)

    @classmethod
    def open_or_build(cls, source: ModelSource, layers: list[int], dtype: torch.dtype, directory: Path,
                      progress: bool | None = None) -> "OffloadStore":
        fingerprint = source_fingerprint(source, dtype)
        existing = cls._open(directory, fingerprint, layers)
        return existing if existing is not None else cls._build(source, layers, dtype, directory, fingerprint, progress)

    @classmethod
    def _open(cls, directory: Path, fingerprint: str, layers: list[int]) -> "OffloadStore | None":
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("version") != STORE_VERSION or manifest.get("fingerprint") != fingerprint:
            return None
        stored = {int(k): StoredLayer(layer=v["layer"], offset=v["offset"], nbytes=v["nbytes"],
                                      tensors=[StoredTensor(**t) for t in v["tensors"]])
                  for k, v in manifest["layers"].items()}
        data = directory / DATA_FILE
        if sorted(stored) != sorted(layers) or not data.is_file() or data.stat().st_size != manifest["data_bytes"]:
            return None
        return cls(directory, stored)

    @classmethod
    def _build(cls, source: ModelSource, layers: list[int], dtype: torch.dtype, directory: Path,
               fingerprint: str, progress: bool | None) -> "OffloadStore":
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)  # the store is incomplete until the manifest is back
        present = set(source.tensor_names())
        stored: dict[int, StoredLayer] = {}
        tmp = directory / (DATA_FILE + ".tmp")
        bar = progress_bar(len(layers), "writing offload store", progress, unit="layer")
        offset = 0
        with tmp.open("wb") as f:
            for i in layers:
                tensors, pos = [], 0
                for leaf in LAYER_TENSORS:
                    if layer_name(i, leaf) not in present:
                        continue
                    t = source.load(layer_name(i, leaf), dtype).contiguous()
                    raw = t.view(torch.uint8).numpy().tobytes()
                    f.write(raw + b"\0" * (align_up(len(raw)) - len(raw)))
                    tensors.append(StoredTensor(leaf, str(dtype).removeprefix("torch."), list(t.shape), pos,
                                                len(raw), zlib.crc32(raw)))
                    pos += align_up(len(raw))
                stored[i] = StoredLayer(i, offset, pos, tensors)
                offset += pos
                bar.update()
            f.flush()
            os.fsync(f.fileno())
        bar.close()
        os.replace(tmp, directory / DATA_FILE)
        drop_from_page_cache(directory / DATA_FILE)  # written pages must not stay behind as a hidden RAM tier
        manifest = {"version": STORE_VERSION, "fingerprint": fingerprint, "data_bytes": offset,
                    "layers": {str(i): asdict(s) for i, s in stored.items()}}
        mtmp = directory / (MANIFEST + ".tmp")
        mtmp.write_text(json.dumps(manifest))
        os.replace(mtmp, directory / MANIFEST)
        return cls(directory, stored)

    def open_reader(self, direct: bool = True) -> DirectFile:
        return DirectFile(self.directory / DATA_FILE, direct=direct)

    def read_layer(self, reader: DirectFile, i: int, buf: AlignedBuffer, verify: bool = False) -> dict[str, torch.Tensor]:
        """Read layer i into `buf` (one aligned read); return tensors that are views of `buf`.
        NOTE: the views are valid only while `buf` holds this layer (until the ring reuses it)."""
        s = self.layers[i]
        if buf.nbytes < s.nbytes:
            raise ValueError(f"buffer of {buf.nbytes} B cannot hold layer {i} ({s.nbytes} B)")
        if reader.read_into(buf.view, s.offset, s.nbytes) != s.nbytes:
            raise ModelFormatError(f"{self.directory / DATA_FILE}: short read for layer {i} (file truncated?)")
        out = {}
        for t in s.tensors:
            view = buf.view[t.offset:t.offset + t.nbytes]
            if verify and zlib.crc32(view) != t.crc32:
                raise ChecksumError(f"{self.directory / DATA_FILE}: checksum mismatch in layer {i} tensor {t.name}")
            out[t.name] = torch.frombuffer(view, dtype=STORAGE_DTYPES[t.dtype]).view(t.shape)
        return out
