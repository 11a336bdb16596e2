"""Matrices held in GGUF's own blocks (QuantTensor kind "ggml"): the bytes in the file are the bytes in RAM, in
the offload store and in the ring, and the native kernels (native/csrc/ggml_dot.cpp) multiply them as they are.

Layout: qweight uint8 [bytes], the matrix's rows [N, K] in HF order, row after row in their blocks; `runs`
((ggml type id, rows), ...) says which type each run of consecutive rows is in (a fused q/k/v of a Q4_K_M file
is Q5_0 rows then Q8_0 rows). A row of type t is K / block_size(t) blocks of block_bytes(t).

Without the native library the fallback dequantises a piece of rows at a time with gguf-py (never the whole
matrix): correct, slow.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

# What the kernels read (ggml_dot.cpp's GgmlType).
KERNEL_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL,
                          Q.IQ4_XS})

Runs = tuple[tuple[int, int], ...]  # ((ggml type id, rows), ...) in row order


def takes(qtype: int, k: int) -> bool:
    """Whether a matrix of this type and K is held in its blocks (the kernels read it)."""
    return qtype in KERNEL_TYPES and k % GGML_QUANT_SIZES[Q(qtype)][0] == 0


def row_bytes(qtype: int, k: int) -> int:
    block, size = GGML_QUANT_SIZES[Q(qtype)]
    return k // block * size


def merge(runs: Iterable[tuple[int, int]]) -> Runs:
    """Adjacent runs of one type as one (so a matrix has one canonical description)."""
    out: list[tuple[int, int]] = []
    for t, r in runs:
        if out and out[-1][0] == t:
            out[-1] = (t, out[-1][1] + r)
        else:
            out.append((int(t), int(r)))
    return tuple(out)


def nbytes(runs: Runs, k: int) -> int:
    return sum(r * row_bytes(t, k) for t, r in runs)


@functools.lru_cache(maxsize=4096)
def runs_tensor(runs: Runs, k: int) -> torch.Tensor:
    """int64 [S, 3] (type, rows, K) as the native library takes a matrix's runs (memoised: built once per
    distinct matrix shape, not once per step)."""
    return torch.tensor([[t, r, k] for t, r in runs], dtype=torch.int64)


def _rows_of(runs: Runs, k: int, rows: np.ndarray) -> Iterable[tuple[int, np.ndarray, np.ndarray, int, int]]:
    """(type, positions in `rows`, rows within the run, byte offset of the run, its rows) for every run `rows`
    touch."""
    start, off = 0, 0
    for t, r in runs:
        sel = np.nonzero((rows >= start) & (rows < start + r))[0]
        if sel.size:
            yield t, sel, rows[sel] - start, off, r
        start, off = start + r, off + r * row_bytes(t, k)


def dequantize_rows(qweight: torch.Tensor, runs: Runs, k: int, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The dense fp32 rows `rows` (int indices) [len(rows), K], dequantised as gguf-py does (ggml's reference)."""
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((idx.size, k), dtype=np.float32)
    raw = qweight.cpu().numpy()  # the fallback on other devices dequantises on the CPU
    for t, sel, local, off, count in _rows_of(runs, k, idx):
        rb = row_bytes(t, k)
        block = raw[off:off + count * rb].reshape(count, rb)[local]  # [len(sel), row bytes]
        out[sel] = gguf_dequantize(block, Q(t)).reshape(len(sel), k)
    return torch.from_numpy(out).to(qweight.device)


def dequantize(qweight: torch.Tensor, runs: Runs, k: int, rows: slice = slice(None)) -> torch.Tensor:
    n = sum(r for _, r in runs)
    return dequantize_rows(qweight, runs, k, np.arange(*rows.indices(n)))
