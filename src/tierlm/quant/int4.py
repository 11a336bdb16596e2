"""int4 weight-only quantisation (W4A16): asymmetric, group-wise along K (g = 32/64/128).

Stored layout of qweight: with the native kernels (tierlm/native, built at install), GGUF's own Q4 order, row by
row — byte t of a 32-column group holds column t in its low nibble and column t + 16 in its high one — which
the integer-dot kernels read (a Q4_0/Q4_1 file's nibbles are copied as they are). Without them, torch's CPU
int4pack layout, so the fused `_weight_int4pack_mm_for_cpu` reads the stored (and streamed) bytes directly.
torch picks that layout by the CPU's vector width, so it is probed once per process (`torch_lanes()`):
  rows are packed in blocks of 64; a block is 64 / (2L) parts of [K, L] bytes whose byte (k, j) holds row j
  of the part in its low nibble and row j + L in its high nibble; L = 16 on AVX2, L = 32 on AVX-512.
`lanes()` names the layout in use (GGUF = 0, else L) and is part of the offload store's fingerprint.
Slicing whole 64-row blocks of qweight [N, K/2] is slicing rows of the matrix (used to dequantise in pieces).
If torch's converter matches no known layout, the fused path is off and the dequantising fallback runs
(still correct, with L = 16).

Two forms of a matrix (see tensor.py): as loaded, `scales`/`mins` fp16 [N, G] (w = q * scale + min, GGUF's
formula); as the kernel wants it, `kernel_scales` [G, N, 2] in the activation dtype (w = (q - 8) * s + z).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from tierlm.quant.scheme import INT4_BLOCK_N

if TYPE_CHECKING:  # annotations only: tensor.py imports this codec, which needs no QuantTensor to run
    from tierlm.quant.tensor import QuantTensor

_LANES = (16, 32)  # AVX2, AVX-512 builds of torch's CPU int4 kernel
GGUF = 0  # lanes() of GGUF's nibble order (the native kernels')


def pack(q: torch.Tensor, lanes: int | None = None) -> torch.Tensor:
    """q uint8 [N, K] with values 0..15 (N % 64 == 0, K % 32 == 0) -> uint8 [N, K/2] in the layout `lanes`
    (default: the one in use, lanes())."""
    lanes = layout() if lanes is None else lanes
    n, k = q.shape
    if lanes == GGUF:
        g = q.to(torch.uint8).reshape(n, k // 32, 2, 16)  # [N, G, half, 16]
        return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2)
    parts = INT4_BLOCK_N // (2 * lanes)
    q = q.to(torch.uint8).reshape(n // INT4_BLOCK_N, parts, 2, lanes, k)  # [block, part, nibble, j, K]
    b = q[:, :, 0] | (q[:, :, 1] << 4)  # [block, part, L, K]
    return b.transpose(-1, -2).contiguous().reshape(n, k // 2)


def unpack(p: torch.Tensor, k: int, lanes: int | None = None) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] values 0..15 (the inverse of pack)."""
    lanes = layout() if lanes is None else lanes
    n = p.shape[0]
    if lanes == GGUF:
        b = p.reshape(n, k // 32, 1, 16)
        return torch.cat((b & 15, b >> 4), dim=2).reshape(n, k)
    b = p.reshape(n // INT4_BLOCK_N, INT4_BLOCK_N // (2 * lanes), k, lanes).transpose(-1, -2)  # [block, part, L, K]
    return torch.stack((b & 15, b >> 4), dim=2).reshape(n, k)  # [block, part, nibble, L, K] -> [N, K]


@functools.cache
def torch_lanes() -> int | None:
    """The lane count L of torch's CPU int4 layout on this machine, or None when pack() matches none of them
    (the fused kernel is then not used). Checked once per process on a 128 x 64 probe."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None:
        return None
    probe = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        theirs = convert(probe, 1)
    except RuntimeError:
        return None
    return next((lanes for lanes in _LANES if torch.equal(theirs, pack(probe, lanes))), None)


@functools.cache
def layout() -> int:
    """The layout stored int4 matrices take in this process: GGUF with the native kernels, else torch's L (16
    when torch's matches none: the dequantising fallback reads it)."""
    from tierlm import native
    return GGUF if native.available() else torch_lanes() or 16


def layout_matches_torch() -> bool:
    """Whether int4 matrices take torch's fused-kernel form (its layout, kernel_scales)."""
    return layout() != GGUF and torch_lanes() is not None


def layout_tag() -> str:
    """What stored int4 bytes depend on besides the weights (goes into the offload store's fingerprint)."""
    if layout() == GGUF:
        return "int4-gguf"  # native kernels: loaded form (scales, mins), GGUF nibble order
    lanes = torch_lanes()
    return f"int4pack-L{lanes}" if lanes else "int4-loaded-form"  # no fused layout: stored scales/mins


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


def pack_gguf_nibbles(qs: torch.Tensor, lanes: int | None = None) -> torch.Tensor:
    """GGUF Q4_0/Q4_1 nibbles straight into torch's layout, byte to byte, without a byte per value:
    qs uint8 [R, G, 16] (R % 64 == 0), where byte t of group g holds column 32g + t in its low nibble and
    32g + t + 16 in its high one -> uint8 [R, K/2] equal to pack(q) of the same values (tested).
    Half the passes over half the bytes of unpack-then-pack: loading a 7B Q4 file is mostly this."""
    lanes = layout() if lanes is None else lanes
    r, g, _ = qs.shape
    if lanes == GGUF:
        return qs.reshape(r, g * 16).contiguous()  # already the layout
    parts = INT4_BLOCK_N // (2 * lanes)
    b = qs.reshape(r // INT4_BLOCK_N, parts, 2, lanes, g, 16)  # [block, part, row half, j, G, 16]
    lo, hi = b[:, :, 0], b[:, :, 1]  # rows j and j + L of each part: the low and high nibble of a packed byte
    first = (lo & 15) | ((hi & 15) << 4)  # columns 32g + t, t < 16
    second = (lo >> 4) | (hi & 0xF0)  # columns 32g + t + 16
    cols = torch.cat((first, second), dim=-1).reshape(r // INT4_BLOCK_N, parts, lanes, g * 32)  # [.., L, K]
    return cols.transpose(-1, -2).contiguous().reshape(r, g * 16)  # [block, part, K, L] -> [R, K/2]


def kernel_scales(t: QuantTensor, act_dtype: torch.dtype) -> torch.Tensor:
    """[G, N, 2] (scale, zero) in `act_dtype`: torch's kernel computes (q - 8) * scale + zero, so
    zero = min + 8 * scale (computed in fp32, then rounded once to the activation dtype)."""
    s, m = t.scales.float(), t.mins.float()  # [N, G]
    return torch.stack((s, m + 8 * s), dim=-1).transpose(0, 1).contiguous().to(act_dtype)


def _dense(q: torch.Tensor, t: QuantTensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """q uint8 [R, K] of rows `rows` -> fp32 [R, K], from whichever form `t` holds."""
    r, k = q.shape
    g = t.group_size
    qf = q.float().reshape(r, k // g, g)  # [R, G, g]; the one dense temporary (in-place from here on)
    if t.kernel_scales is not None:
        sz = t.kernel_scales[:, rows].float()  # [G, R, 2]
        return qf.sub_(8).mul_(sz[..., 0].t()[..., None]).add_(sz[..., 1].t()[..., None]).reshape(r, k)
    return qf.mul_(t.scales[rows].float()[..., None]).add_(t.mins[rows].float()[..., None]).reshape(r, k)


def dequantize(t: QuantTensor, rows: slice = slice(None)) -> torch.Tensor:
    """-> fp32 [R, K] for a slice of rows whose bounds are multiples of 64 (default: all rows)."""
    return _dense(unpack(t.qweight[rows], t.shape[1]), t, rows)


def dequantize_rows(t: QuantTensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` [R] -> fp32 [R, K]: unpacks only the 64-row blocks that hold them."""
    n, k = t.shape
    if layout() == GGUF:
        return _dense(unpack(t.qweight[rows], k), t, rows)
    blocks = t.qweight.reshape(n // INT4_BLOCK_N, INT4_BLOCK_N, k // 2)[rows // INT4_BLOCK_N]  # [R, 64, K/2]
    q = torch.stack([unpack(b, k)[r] for b, r in zip(blocks, (rows % INT4_BLOCK_N).tolist())])  # [R, K]
    return _dense(q, t, rows)
