"""linear(x, w, b): the one matmul entry point of the model. Dense tensors go to F.linear; QuantTensors go
to torch's fused weight-only kernels when prepared for them, else are dequantised first (the fallback,
tested against the fused path).

On this 2-core AVX2 class of CPU (measured, see benchmarks/decode.py): a bf16-activation GEMV with
`_weight_int8pack_mm` runs 3-8x faster than fp32 F.linear and `_weight_int4pack_mm_for_cpu` 2-6x; the fused
kernels want activations in bf16 (fp32 activations are 5-10x slower there). For many rows (prefill) a
dequantised fp32 GEMM beats them, because these CPUs have no native bf16 matmul: above PREFILL_ROWS rows
the weight is dequantised to fp32 once for the whole chunk.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from tierlm.quant import int4, int8
from tierlm.quant.tensor import QuantTensor

PREFILL_ROWS = 128  # at or above this many rows, dequantise + fp32 GEMM (measured crossover: ~128 rows)


def prepare(w: QuantTensor, act_dtype: torch.dtype) -> QuantTensor:
    """w with kernel_scales set for the fused CPU kernel (unchanged where no fused kernel applies)."""
    if w.qweight.device.type != "cpu":
        return w  # CUDA: dequantising fallback (the CUDA int4 layout differs; not yet wired)
    n = w.shape[0]
    if w.kind == "int8" and w.group_size == w.shape[1]:
        return replace(w, kernel_scales=w.scales.reshape(n).to(act_dtype))
    if w.kind == "int4" and int4.layout_matches_torch():
        s, m = w.scales.float(), w.mins.float()  # [N, G]
        # torch's kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale
        sz = torch.stack((s, m + 8 * s), dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
        return replace(w, kernel_scales=sz.to(act_dtype))
    return w


def linear(x: torch.Tensor, w: torch.Tensor | QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T (+ bias [N]) -> [..., N] in x's dtype."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    ks = w.kernel_scales
    if ks is not None and ks.dtype == x.dtype and x2.shape[0] < PREFILL_ROWS:
        if w.kind == "int8":
            y = torch._weight_int8pack_mm(x2, w.qweight, ks)  # [M, N]
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, w.qweight, w.group_size, ks)  # [M, N]
        if bias is not None:
            y = y + bias
    else:
        y = fallback_linear(x2, w, bias)
    return y.reshape(*lead, w.shape[0])


def fallback_linear(x2: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise to fp32, fp32 GEMM, back to x's dtype: x2 [M, K] -> [M, N]."""
    y = F.linear(x2.float(), w.dequantize(torch.float32), None if bias is None else bias.float())
    return y.to(x2.dtype)


def embedding_rows(w: torch.Tensor | QuantTensor, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tokens [B, T] -> [B, T, H] rows of an embedding matrix, dense or quantised (a tied, quantised head)."""
    if isinstance(w, torch.Tensor):
        return F.embedding(tokens, w)
    unique, inverse = torch.unique(tokens, return_inverse=True)  # dequantise each distinct row once
    rows = (int8 if w.kind == "int8" else int4).dequantize_rows(w, unique)  # [U, H] fp32
    return rows.to(dtype)[inverse]
