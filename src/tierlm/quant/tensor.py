"""QuantTensor: one weight-only quantised matrix [N, K] (torch Linear layout) and its stored parts.

Parts (what the offload store writes and the streamer moves, each a plain tensor):
  int8            qweight int8 [N, K]      scales fp32 [N, 1] (per channel) | fp16 [N, K/g] (group-wise)
  int4            qweight uint8 [N, K/2]   (torch's CPU int4pack layout, see int4.py)
                  scales fp16 [N, K/g]     mins fp16 [N, K/g]        w = q * scale + min, q in 0..15
Dense value: int8 w = q * scale; int4 w = q * scale + min, computed in fp32 (the exact formula GGUF uses,
so Q8_0 / Q4_0 / Q4_1 blocks dequantise bit for bit as gguf-py does).

`kernel_scales` is the same information in the form and dtype torch's fused kernel wants; prepare() builds
it once for a resident matrix (per acquire for a streamed one). Without it linear() dequantises instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from tierlm.quant.scheme import QuantScheme

PARTS = ("qweight", "scales", "mins")


@dataclass(frozen=True)
class QuantTensor:
    kind: str  # "int8" | "int4"
    shape: tuple[int, int]  # [N, K] of the dense matrix
    group_size: int  # K for int8 per channel
    qweight: torch.Tensor  # int8 [N, K] | uint8 [N, K/2]
    scales: torch.Tensor  # [N, K/g] (int8 per channel: [N, 1])
    mins: torch.Tensor | None = None  # int4 only: [N, K/g]
    kernel_scales: torch.Tensor | None = None  # int8: [N] in the activation dtype; int4: [K/g, N, 2]

    def parts(self) -> dict[str, torch.Tensor]:
        """Stored parts by name (qweight, scales[, mins])."""
        out = {"qweight": self.qweight, "scales": self.scales}
        return out | ({"mins": self.mins} if self.mins is not None else {})

    def meta(self) -> dict:
        """What the manifest records beside the parts: never guessed, always read back."""
        return {"kind": self.kind, "shape": list(self.shape), "group_size": self.group_size}

    @classmethod
    def from_parts(cls, meta: dict, parts: dict[str, torch.Tensor]) -> "QuantTensor":
        return cls(meta["kind"], tuple(meta["shape"]), meta["group_size"], parts["qweight"], parts["scales"],
                   parts.get("mins"))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def to(self, device: torch.device | str) -> "QuantTensor":
        return replace(self, **{k: v.to(device) for k, v in self.parts().items()}, kernel_scales=None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from tierlm.quant import int4, int8
        return (int8 if self.kind == "int8" else int4).dequantize(self).to(dtype)


def part_specs(scheme: QuantScheme, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every stored part of a matrix `shape` under `scheme` (sizes without the data)."""
    n, k = shape
    if scheme.kind == "int8" and scheme.group_size is None:
        return {"qweight": ((n, k), torch.int8), "scales": ((n, 1), torch.float32)}
    groups = (n, k // scheme.group_size)
    if scheme.kind == "int8":
        return {"qweight": ((n, k), torch.int8), "scales": (groups, torch.float16)}
    return {"qweight": ((n, k // 2), torch.uint8), "scales": (groups, torch.float16), "mins": (groups, torch.float16)}


def dense_or_parts_nbytes(scheme: QuantScheme, shape: tuple[int, ...], dtype: torch.dtype) -> list[int]:
    """Byte sizes of what a tensor stores: its parts when quantised, else one dense tensor of `dtype`."""
    if not scheme.enabled:
        return [math.prod(shape) * dtype.itemsize]
    return [math.prod(s) * d.itemsize for s, d in part_specs(scheme, shape).values()]


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
