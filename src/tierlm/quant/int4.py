"""int4 weight-only quantisation (W4A16): asymmetric, group-wise along K (g = 32/64/128).

Stored layout of qweight = torch's CPU int4pack layout, so the fused `_weight_int4pack_mm_for_cpu` reads the
stored (and streamed) bytes directly, with no repacking per token. Rows are packed in blocks of 64; each
block is two halves of 32 rows; a half is [K, 16] bytes whose byte (k, j) holds row j of the half in its low
nibble and row j + 16 in its high nibble. pack()/unpack() implement it with tensor ops;
`layout_matches_torch()` checks it against torch's own converter (if a future torch changes the layout,
the fused path is switched off and the dequantising fallback runs instead, still correct).
"""
from __future__ import annotations

import functools

import torch

from tierlm.quant.scheme import INT4_BLOCK_N
from tierlm.quant.tensor import QuantTensor


def pack(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] with values 0..15 (N % 64 == 0, K even) -> uint8 [N, K/2]."""
    n, k = q.shape
    q = q.to(torch.uint8).reshape(n // INT4_BLOCK_N, 2, 2, 16, k)  # [block, half, nibble, j, K]
    b = q[:, :, 0] | (q[:, :, 1] << 4)  # [block, half, 16, K]
    return b.transpose(-1, -2).contiguous().reshape(n, k // 2)


def unpack(p: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] values 0..15 (the inverse of pack)."""
    n = p.shape[0]
    b = p.reshape(n // INT4_BLOCK_N, 2, k, 16).transpose(-1, -2)  # [block, half, 16, K]
    return torch.stack((b & 15, b >> 4), dim=2).reshape(n, k)  # [block, half, nibble, 16, K] -> [N, K]


@functools.cache
def layout_matches_torch() -> bool:
    """Does pack() produce what torch's converter does? Checked once per process on a 128 x 64 probe."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None:
        return False
    probe = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        return torch.equal(convert(probe, 1), pack(probe))
    except RuntimeError:
        return False


def quantize_unpacked(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q uint8 [N, K] in 0..15, scale fp16 [N, G], min fp16 [N, G]): min/max per group,
    16 levels. The stored fp16 scale and min are the ones used to round, so each weight is within half a step
    (plus fp16 rounding of the min) of w."""
    n, k = w.shape
    wf = w.float().reshape(n, k // group_size, group_size)  # [N, G, g]
    lo, hi = wf.amin(-1), wf.amax(-1)  # [N, G]
    scale = ((hi - lo) / 15.0).clamp_min(1e-8).to(torch.float16)
    mins = lo.to(torch.float16)
    q = torch.round((wf - mins.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(n, k), scale, mins


def from_blocks(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, group_size: int = 32) -> QuantTensor:
    """w = d*q + m per group: GGUF Q4_1 (Q4_0 comes as m = -8d) without loss, or quantize_unpacked's.
    d, m fp16 [N, K/g]; q uint8 [N, K] in 0..15; N a multiple of 64."""
    n, k = q.shape
    return QuantTensor("int4", (n, k), group_size, pack(q), d.contiguous(), m.contiguous())


def _dense(q: torch.Tensor, t: QuantTensor, rows: torch.Tensor | slice) -> torch.Tensor:
    r, k = q.shape
    g = t.group_size
    qf = q.float().reshape(r, k // g, g)  # [R, G, g]
    return (qf * t.scales[rows].float()[..., None] + t.mins[rows].float()[..., None]).reshape(r, k)


def dequantize(t: QuantTensor) -> torch.Tensor:
    """-> fp32 [N, K], q * scale + min in fp32 (gguf-py's formula)."""
    return _dense(unpack(t.qweight, t.shape[1]), t, slice(None))


def dequantize_rows(t: QuantTensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` [R] -> fp32 [R, K]: unpacks only the 64-row blocks that hold them."""
    n, k = t.shape
    blocks = t.qweight.reshape(n // INT4_BLOCK_N, INT4_BLOCK_N, k // 2)[rows // INT4_BLOCK_N]  # [R, 64, K/2]
    q = torch.stack([unpack(b, k)[r] for b, r in zip(blocks, (rows % INT4_BLOCK_N).tolist())])  # [R, K]
    return _dense(q, t, rows)
