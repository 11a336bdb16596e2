"""QuantTensor: one weight-only quantised matrix [N, K] (torch Linear layout) and its stored parts.

A matrix has two forms.
As loaded (from GGUF blocks or quantised here), parts:
  int8            qweight int8 [N, K]      scales fp32 [N, 1] (per channel) | fp16 [N, K/g] (group-wise)
  int4            qweight uint8 [N, K/2]   (torch's CPU int4pack layout, see int4.py)
                  scales fp16 [N, K/g]     mins fp16 [N, K/g]        w = q * scale + min, q in 0..15
  Dense value: int8 w = q * scale; int4 w = q * scale + min, computed in fp32 (the exact formula GGUF uses,
  so Q8_0 / Q4_0 / Q4_1 blocks dequantise bit for bit as gguf-py does).
Kernel form (kernels.prepare, done once when a unit is loaded or written to the offload store) — with the native
kernels (tierlm/native) it is the loaded form itself; for torch's fused kernels:
  int8 per channel  qweight, kernel_scales [N] in the activation dtype
  int4              qweight, kernel_scales [G, N, 2] (scale, zero) in the activation dtype
  scales/mins are dropped: the kernel's numbers are the matrix's numbers from then on (the dequantising
  fallback reads them too), so decode, prefill, resident and streamed runs all use one set of weights, and a
  streamed unit's bytes are the kernel's operands: acquiring it is views over the ring slot, nothing else.
Kind "ggml": the matrix in GGUF's own blocks (quant/ggml.py), one form only: qweight uint8 [bytes], `runs` the
  ggml type of each run of rows (recorded in the manifest), group_size K; no other part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from tierlm.quant import ggml, int4, int8
from tierlm.quant.int4 import layout_matches_torch
from tierlm.quant.scheme import QuantScheme, uses_native

PARTS = ("qweight", "scales", "mins", "kernel_scales")


@dataclass(frozen=True)
class QuantTensor:
    kind: str  # "int8" | "int4" | "ggml"
    shape: tuple[int, int]  # [N, K] of the dense matrix
    group_size: int  # K for int8 per channel
    qweight: torch.Tensor  # int8 [N, K] | uint8 [N, K/2]
    scales: torch.Tensor | None  # [N, K/g] (int8 per channel: [N, 1]); None in kernel form
    mins: torch.Tensor | None = None  # int4 only: [N, K/g]; None in kernel form
    kernel_scales: torch.Tensor | None = None  # kernel form: int8 [N], int4 [K/g, N, 2], activation dtype
    runs: ggml.Runs = ()  # ggml: ((ggml type id, rows), ...) in row order

    def parts(self) -> dict[str, torch.Tensor]:
        """Stored parts by name: qweight and whichever of scales / mins / kernel_scales the form has."""
        return {p: t for p in PARTS if (t := getattr(self, p)) is not None}

    def meta(self) -> dict:
        """What the manifest records beside the parts: never guessed, always read back."""
        meta = {"kind": self.kind, "shape": list(self.shape), "group_size": self.group_size}
        return meta | {"runs": [list(r) for r in self.runs]} if self.kind == "ggml" else meta

    @classmethod
    def from_parts(cls, meta: dict, parts: dict[str, torch.Tensor]) -> "QuantTensor":
        return cls(meta["kind"], tuple(meta["shape"]), meta["group_size"], parts["qweight"], parts.get("scales"),
                   parts.get("mins"), parts.get("kernel_scales"), tuple(tuple(r) for r in meta.get("runs", ())))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def to(self, device: torch.device | str) -> "QuantTensor":
        return replace(self, **{k: v.to(device) for k, v in self.parts().items()})

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """Dense rows (default all; int4: slice bounds multiples of 64) in `dtype`, computed in fp32."""
        if self.kind == "ggml":
            return ggml.dequantize(self.qweight, self.runs, self.shape[1], rows).to(dtype)
        return (int8 if self.kind == "int8" else int4).dequantize(self, rows).to(dtype)

    def dequantize_in_pieces(self, dtype: torch.dtype, piece_rows: int) -> torch.Tensor:
        """The whole dense matrix in `dtype`, built `piece_rows` rows (a multiple of 64) at a time: the fp32
        transient is one piece, not the matrix (a tied 49152 x 2048 embedding is 400 MiB in fp32)."""
        out = torch.empty(self.shape, dtype=dtype, device=self.qweight.device)
        for r in range(0, self.shape[0], piece_rows):
            rows = slice(r, min(self.shape[0], r + piece_rows))
            out[rows] = self.dequantize(torch.float32, rows)
        return out


def part_specs(scheme: QuantScheme, shape: tuple[int, int],
               act_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every stored part of a matrix `shape` under `scheme` in the kernel form that
    kernels.prepare gives it for activations in `act_dtype` (sizes without the data)."""
    n, k = shape
    if scheme.kind == "ggml":  # the file's blocks: the scheme of one matrix carries its runs
        return {"qweight": ((ggml.nbytes(scheme.runs, k),), torch.uint8)}
    if scheme.kind == "int8" and scheme.group_size is None:
        if uses_native("int8", k, k):  # the native kernels read the loaded form
            return {"qweight": ((n, k), torch.int8), "scales": ((n, 1), torch.float32)}
        return {"qweight": ((n, k), torch.int8), "kernel_scales": ((n,), act_dtype)}
    groups = (n, k // scheme.group_size)
    if scheme.kind == "int8":
        return {"qweight": ((n, k), torch.int8), "scales": (groups, torch.float16)}
    if layout_matches_torch():
        return {"qweight": ((n, k // 2), torch.uint8), "kernel_scales": ((groups[1], n, 2), act_dtype)}
    return {"qweight": ((n, k // 2), torch.uint8), "scales": (groups, torch.float16), "mins": (groups, torch.float16)}


def dense_or_parts_nbytes(scheme: QuantScheme, shape: tuple[int, ...], dtype: torch.dtype) -> list[int]:
    """Byte sizes of what a tensor stores: its parts (kernel form for activations in `dtype`) when
    quantised, else one dense tensor of `dtype`."""
    if not scheme.enabled:
        return [math.prod(shape) * dtype.itemsize]
    return [math.prod(s) * d.itemsize for s, d in part_specs(scheme, shape, dtype).values()]


@dataclass(frozen=True)
class QuantBlocks:
    """A quantised matrix before packing (GGUF blocks, or rows quantised a chunk at a time): rows can still be
    concatenated freely. int4: q uint8 [N, K] in 0..15, w = q * scales + mins; int8: q int8 [N, K],
    w = q * scales."""

    kind: str
    group_size: int  # K for int8 per channel
    scales: torch.Tensor  # [N, K/g]
    mins: torch.Tensor | None  # [N, K/g] (int4)
    q: torch.Tensor  # [N, K]

    @staticmethod
    def concat(blocks: list["QuantBlocks"]) -> "QuantBlocks":
        first = blocks[0]
        if any((b.kind, b.group_size) != (first.kind, first.group_size) for b in blocks):
            raise ValueError("cannot concatenate blocks of different kinds or group sizes")
        if len(blocks) == 1:
            return first
        cat = lambda f: None if getattr(first, f) is None else torch.cat([getattr(b, f) for b in blocks])  # noqa: E731
        return QuantBlocks(first.kind, first.group_size, cat("scales"), cat("mins"), cat("q"))
