"""Streaming GGUF writer: a model larger than RAM is written one chunk of rows at a time.

gguf-py's GGUFWriter packs the header, the metadata and the tensor directory (so key types and layout are
exactly what llama.cpp reads); tensor bytes then go straight to the file as the caller produces them, instead
of GGUFWriter holding every tensor until write_tensors_to_file. The file is written under a temp name in the
target directory (the name carries the pid, so two writers never collide), fsynced, and renamed into place
only when complete; on any error or Ctrl-C the temp file is removed.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter


@dataclass(frozen=True)
class GGUFTensorSpec:
    name: str  # llama.cpp name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy order [out, in] (GGUF's ne reversed), as GGUFWriter takes it
    qtype: GGMLQuantizationType

    @property
    def rows(self) -> int:
        return prod(self.shape[:-1])

    @property
    def row_bytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        if self.shape[-1] % block:
            raise ValueError(f"{self.name}: row of {self.shape[-1]} is not a multiple of {self.qtype.name}'s {block}")
        return self.shape[-1] // block * type_size

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def write_gguf(path: Path, arch: str, metadata: Callable[[GGUFWriter], None], specs: list[GGUFTensorSpec],
               data: Callable[[GGUFTensorSpec], Iterable[np.ndarray]],
               on_bytes: Callable[[int], None] = lambda n: None) -> Path:
    """metadata(writer) adds the key/values; data(spec) yields that tensor's stored bytes (uint8 arrays of
    whole rows, in order). Tensors are written in `specs` order."""
    tmp = temp_path(path)
    w = GGUFWriter(tmp, arch)
    try:
        metadata(w)
        for s in specs:
            # tensor_dtype float32 so GGUFWriter takes the shape as elements (uint8 would mean a byte shape).
            w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.nbytes, raw_dtype=s.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        for s in specs:
            _pad(f, w.data_alignment)  # every tensor starts aligned (the data section too)
            written = 0
            for chunk in data(s):
                chunk = np.ascontiguousarray(chunk)
                f.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
                on_bytes(chunk.nbytes)
            if written != s.nbytes:
                raise ValueError(f"{s.name}: wrote {written} bytes, expected {s.nbytes}")
        _pad(f, w.data_alignment)
        f.flush()
        os.fsync(f.fileno())
        # Evict what was just written: a benchmark reading this model must not find it in the page cache.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        w.close()
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written model behind
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _pad(f: BinaryIO, align: int) -> None:
    f.write(b"\0" * (-f.tell() % align))
