"""Weight-only quantisation: W8A16 (int8, per output channel or group-wise) and W4A16 (int4, group-wise).

    scheme.py   QuantScheme: what the user asked for (kind, group size) and which matrices it applies to
    tensor.py   QuantTensor: a packed matrix with its scales, its stored parts and its dense form
    int8.py / int4.py   quantise, pack/unpack, dequantise (pure functions)
    kernels.py  linear(x, w): torch's fused weight-only kernels, or dequantise-then-matmul
"""
import torch

from tierlm.quant import int4, int8
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import QuantBlocks, QuantTensor

__all__ = ["QuantBlocks", "QuantScheme", "QuantTensor", "from_blocks", "quantize", "quantize_blocks"]


ROW_CHUNK = 256  # rows quantised at a time: bounds the fp32 temporaries (the clip search makes several)


def quantize_blocks(w: torch.Tensor, scheme: QuantScheme) -> QuantBlocks:
    """w [N, K] float -> unpacked quantised rows under `scheme`, ROW_CHUNK rows at a time."""
    n, k = w.shape
    qs, scales, mins = [], [], []
    for r in range(0, n, ROW_CHUNK):
        rows = w[r:r + ROW_CHUNK]
        if scheme.kind == "int8":
            q, s = int8.quantize_unpacked(rows, scheme.group_size)
        elif scheme.kind == "int4":
            q, s, m = int4.quantize_unpacked(rows, scheme.group_size)
            mins.append(m)
        else:
            raise ValueError(f"cannot quantize with scheme {scheme}")
        qs.append(q)
        scales.append(s)
    return QuantBlocks(scheme.kind, scheme.group_size or k, torch.cat(scales), torch.cat(mins) if mins else None,
                       torch.cat(qs))


def from_blocks(b: QuantBlocks) -> QuantTensor:
    """Pack unpacked rows (GGUF blocks or quantize_blocks') without changing a single dense value.
    int8: w = d * q per group (GGUF Q8_0: d fp16 [N, K/32], q int8 [N, K]); int4: w = d*q + m per group (GGUF
    Q4_1; Q4_0 comes as m = -8d), d, m fp16 [N, K/g], q uint8 [N, K] in 0..15, N a multiple of 64."""
    n, k = b.q.shape
    if b.kind == "int8":
        return QuantTensor("int8", (n, k), b.group_size, b.q.contiguous(), b.scales.contiguous())
    return QuantTensor("int4", (n, k), b.group_size, int4.pack(b.q), b.scales.contiguous(), b.mins.contiguous())


def quantize(w: torch.Tensor, scheme: QuantScheme) -> QuantTensor:
    """w [N, K] float -> packed matrix under `scheme` (int8 per channel or group-wise, int4 group-wise)."""
    return from_blocks(quantize_blocks(w, scheme))
