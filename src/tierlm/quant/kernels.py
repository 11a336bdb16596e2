"""linear(x, w, b): the one matmul entry point of the model. Dense tensors go to F.linear; QuantTensors go to
the native integer-dot kernels when they are built (tierlm/native: activations quantised to int8 per 32
columns, as llama.cpp; `exact` keeps them fp32), else, in kernel form, to torch's fused weight-only kernels,
else are dequantised (the fallback, tested against the fused paths). All of them are row-invariant.

The fused kernels want activations in bf16 (fp32 activations are 5-10x slower there). Every row count
takes them, prefill included: they are row-invariant (a row's result does not depend on how many rows share
the call; checked for 1-600 rows on every matrix of the embedded model) while a dequantised GEMM is not
(MKL takes other paths for small M), and exactness needs it: a prefix hit prefills only the suffix, a
preempted sequence is recomputed in one chunk, and each must give the bits a cold prefill gave. On the
AVX-512-bf16 EPYC they are faster too (512 rows of w_gateup: 11.9 ms vs 20.5 dequantised); an AVX2 machine
measured a crossover near 128 rows once (PREFILL_ROWS), a speed given up for exactness.
The fallback (no kernel form, other activation dtypes, CUDA) dequantises in pieces of rows, so the dense
transient is bounded (DEQUANT_PIECE_BYTES) whatever the matrix: a whole TinyLlama w_gateup in fp32 would be
90 MiB, through three temporaries 290 MiB, counted nowhere.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from tierlm import native
from tierlm.quant import ggml, int4, int8, intdot
from tierlm.quant.scheme import INT4_BLOCK_N, uses_native
from tierlm.quant.tensor import QuantTensor

# Bumped whenever a change alters the bits a forward pass computes: it is part of the KV salt, so blocks that
# earlier numerics wrote to disk (the KV tier persists between runs; saved sessions) are never served as ours.
NUMERICS_VERSION = 3  # 2: fused int4/int8 kernels for every row count (the native kernels: intdot.numerics_tag); 3: attention pads to 16 rows
PREFILL_ROWS = 128  # the planner counts the fallback's transient from this many rows (when it applies)
DEQUANT_PIECE_BYTES = 8 << 20  # the fallback's dense fp32 weight piece (plus its unpacked uint8 codes)


def prepare(w: QuantTensor, act_dtype: torch.dtype) -> QuantTensor:
    """w in kernel form for activations in `act_dtype` (see tensor.py), or unchanged where no fused kernel
    applies (group-wise int8; an int4 layout torch does not share), or the native kernels read the loaded form.
    Idempotent. A "ggml" matrix has one form."""
    if w.kind == "ggml" or w.kernel_scales is not None or uses_native(w.kind, w.group_size, w.shape[1]):
        return w
    n = w.shape[0]
    if w.kind == "int8" and w.group_size == w.shape[1]:
        return replace(w, scales=None, kernel_scales=w.scales.reshape(n).to(act_dtype))
    if w.kind == "int4" and int4.layout_matches_torch():
        return replace(w, scales=None, mins=None, kernel_scales=int4.kernel_scales(w, act_dtype))
    return w


def linear(x: torch.Tensor, w: torch.Tensor | QuantTensor, bias: torch.Tensor | None = None,
           exact: bool = False) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T (+ bias [N]) -> [..., N] in x's dtype. exact: no int8 activations (native; GGUF
    blocks: the dequantising fallback)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if w.kind == "ggml" and not exact and x.device.type == "cpu" and native.layer_step_available():
        return native.lib().ggml_linear(x, w.qweight, ggml.runs_tensor(w.runs, w.shape[1]), bias)
    if x.device.type == "cpu" and intdot.runs(w):
        return intdot.linear(x, w, bias, exact)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    ks = w.kernel_scales
    if ks is not None and ks.dtype == x.dtype and x2.device.type == "cpu":  # any row count: row-invariant
        if w.kind == "int8":
            y = torch._weight_int8pack_mm(x2, w.qweight, ks)  # [M, N]
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, w.qweight, w.group_size, ks)  # [M, N]
        if bias is not None:
            y = y + bias
    else:
        y = fallback_linear(x2, w, bias)
    return y.reshape(*lead, w.shape[0])


def piece_rows(w: QuantTensor) -> int:
    """Rows dequantised at a time by the fallback: DEQUANT_PIECE_BYTES of fp32, whole 64-row blocks."""
    rows = DEQUANT_PIECE_BYTES // (4 * w.shape[1])
    return max(INT4_BLOCK_N, rows - rows % INT4_BLOCK_N)


def fallback_linear(x2: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise to fp32 piece by piece of rows, fp32 GEMM into the output's columns in x's dtype:
    x2 [M, K] -> [M, N]. The transient is x2 in fp32, one dense piece and its [M, piece] product, not the
    matrix (nor an fp32 [M, N] output: 45 MiB for a 7B w_gateup at 512 rows)."""
    n = w.shape[0]
    xf = x2.float()  # [M, K]
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)  # [M, N]
    step = piece_rows(w)
    for r in range(0, n, step):
        rows = slice(r, min(n, r + step))
        part = xf @ w.dequantize(torch.float32, rows).t()  # [M, R] fp32
        if bias is not None:
            part += bias[rows].float()
        y[:, rows] = part
    return y


def embedding_rows(w: torch.Tensor | QuantTensor, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tokens [B, T] -> [B, T, H] rows of an embedding matrix, dense or quantised (a tied, quantised head)."""
    if isinstance(w, torch.Tensor):
        return F.embedding(tokens, w)
    unique, inverse = torch.unique(tokens, return_inverse=True)  # dequantise each distinct row once
    if w.kind == "ggml":
        rows = ggml.dequantize_rows(w.qweight, w.runs, w.shape[1], unique)  # [U, H] fp32
    else:
        rows = (int8 if w.kind == "int8" else int4).dequantize_rows(w, unique)  # [U, H] fp32
    return rows.to(dtype)[inverse]
