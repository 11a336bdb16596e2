"""Streaming safetensors writer: tensors are produced one at a time and written straight to disk, so a
model larger than RAM can be written. Each shard is written to a temp file and renamed (atomic)."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.finfo(self.dtype).bits // 8


def write_shard(path: Path, specs: list[TensorSpec], make: Callable[[TensorSpec], torch.Tensor],
                on_tensor: Callable[[TensorSpec], None] = lambda s: None,
                metadata: dict[str, str] | None = None) -> None:
    """Write `specs` (in order) to one safetensors file; make(spec) returns that tensor's data."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            t = make(s)
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise ValueError(f"{s.name}: made {tuple(t.shape)} {t.dtype}, expected {s.shape} {s.dtype}")
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
            on_tensor(s)
        f.flush()
        os.fsync(f.fileno())
        # Evict what was just written: a benchmark reading this model must not find it in the page cache.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.replace(tmp, path)


def shard(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards
