"""int8 weight-only quantisation (W8A16): symmetric, one scale per output channel or per group of g inputs.

Per channel feeds torch's fused `_weight_int8pack_mm`; group-wise (GGUF Q8_0 is g=32) dequantises first.
"""
from __future__ import annotations

import torch

from tierlm.quant.tensor import QuantTensor


def quantize(w: torch.Tensor, group_size: int | None = None) -> QuantTensor:
    """w [N, K] float -> QuantTensor. The stored scale (fp32 per channel, fp16 per group) is the one used to
    round, so dequantise(quantise(w)) is within half a step of w."""
    n, k = w.shape
    g = k if group_size is None else group_size
    wf = w.float().reshape(n, k // g, g)  # [N, G, g]
    scale = (wf.abs().amax(-1) / 127.0).clamp_min(1e-12)  # [N, G]
    scale = scale.to(torch.float32 if group_size is None else torch.float16)
    q = torch.round(wf / scale.float()[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return QuantTensor("int8", (n, k), g, q, scale)


def from_blocks(d: torch.Tensor, q: torch.Tensor) -> QuantTensor:
    """GGUF Q8_0 without loss: d fp16 [N, K/32], q int8 [N, K]; w = d * q."""
    n, k = q.shape
    return QuantTensor("int8", (n, k), 32, q.contiguous(), d.contiguous())


def dequantize(t: QuantTensor) -> torch.Tensor:
    """-> fp32 [N, K]."""
    n, k = t.shape
    q = t.qweight.float().reshape(n, k // t.group_size, t.group_size)  # [N, G, g]
    return (q * t.scales.float()[..., None]).reshape(n, k)


def dequantize_rows(t: QuantTensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` [R] of the dense matrix -> fp32 [R, K] (embedding lookups from a tied, quantised head)."""
    k = t.shape[1]
    q = t.qweight[rows].float().reshape(len(rows), k // t.group_size, t.group_size)
    return (q * t.scales[rows].float()[..., None]).reshape(len(rows), k)
