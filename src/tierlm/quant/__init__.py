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

__all__ = ["QuantBlocks", "QuantScheme", "QuantTensor", "from_blocks", "quantize"]


def quantize(w: torch.Tensor, scheme: QuantScheme) -> QuantTensor:
    """w [N, K] float -> packed matrix under `scheme` (int8 per channel or group-wise, int4 group-wise)."""
    if scheme.kind == "int8":
        return int8.quantize(w, scheme.group_size)
    if scheme.kind == "int4":
        return int4.quantize(w, scheme.group_size)
    raise ValueError(f"cannot quantize with scheme {scheme}")


def from_blocks(b: QuantBlocks) -> QuantTensor:
    """Pack GGUF-style blocks (g=32) without changing a single dense value."""
    return int8.from_blocks(b.scales, b.q) if b.kind == "int8" else int4.from_blocks(b.scales, b.mins, b.q)
