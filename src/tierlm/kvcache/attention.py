"""Attention over a step's keys, laid out in KV blocks: the fixed-shape, batch-invariant kind the engine runs
(BlockMask + blocked_attention), and the causal / sliding-window mask for SDPA (attention_mask). Model files call
these; the KV cache builds the masks (step.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

ATTN_ROWS = 64  # query positions attended at a time: bounds the [g*rows, S] score transient of a long chunk
MIN_ROWS = 16  # fp32 matmuls of fewer rows take MKL's small-M path, which rounds differently: pad up to this
# (8 sufficed for head_dim 64 and 128; Gemma 3's 256 rounded differently at M = 8 (decode, g = 4): 12 and up agree)
ATTN_KEYS = 64  # keys per partial sum (a fixed shape for every row): 4x fewer, larger matmuls than per KV block


@dataclass(frozen=True)
class BlockMask:
    """Keys of a step laid out in KV blocks: valid [B, T, S] (S = blocks × block) marks the keys each new token
    of each sequence may see (its own, up to its position); the rest (a last block's tail, blocks padding a
    sequence to the longest, future positions, and keys padding S to whole ATTN_KEYS groups) are hidden.
    groups: for each ATTN_ROWS query positions, the ATTN_KEYS groups any of them sees (the rest, a chunk's
    causal tail, is left out). Made once per step, read by every layer."""
    valid: torch.Tensor  # [B, T, max(groups) * ATTN_KEYS] bool
    groups: tuple[int, ...]

    @classmethod
    def of(cls, positions: torch.Tensor, num_blocks: int, block: int, window: int | None = None) -> "BlockMask":
        """positions [B, T] of the step's new tokens; keys in num_blocks blocks of `block`. window: also hide keys
        at or before position - window (a local layer's; the keys stay laid out, hidden ones add exact zeros)."""
        last = positions.amax(dim=0).tolist()  # [T]: the furthest key any sequence's token t sees
        groups = tuple((max(last[r0:r0 + ATTN_ROWS]) // block + 1) * block // -ATTN_KEYS * -1
                       for r0 in range(0, len(last), ATTN_ROWS))
        keys = torch.arange(max(groups) * ATTN_KEYS, device=positions.device)
        valid = (keys[None, None, :] <= positions[:, :, None]) & (keys < num_blocks * block)  # [B, T, Sk]
        if window is not None:
            valid &= keys[None, None, :] > positions[:, :, None] - window
        return cls(valid, groups)


def tree_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over `dim` in a fixed order that zero padding cannot change: as if padded with zeros to a power of two
    P, element i gets element i + P/2 added, then the first half is halved again, until one is left. Entries
    past the last nonzero one only ever add exact zeros, so a row's sum is the same however many hidden blocks
    pad it (a cumsum is too, but 10x slower on a strided bf16 dim). Consumes x (adds in place)."""
    n = x.shape[dim]
    while n > 1:
        half = (1 << (n - 1).bit_length()) // 2
        x.narrow(dim, 0, n - half).add_(x.narrow(dim, half, n - half))  # i + half; the padding's zeros: no-ops
        x, n = x.narrow(dim, 0, half), half
    return x.squeeze(dim)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: BlockMask,
                      scale: float | None = None) -> torch.Tensor:
    """q [B, nh, T, hd], k, v [B, nkv, S, hd] -> [B, nh, T, hd], scores scaled by `scale` (None: hd ** -0.5):
    every row computed the same way whatever else is in the step, so a token's attention is bit-identical decoded
    alone, in a batch, or prefilled in a chunk of any length (a prefix hit's suffix, a preempted sequence
    recomputed, a cold prompt).

    Every reduction has a fixed shape or a fixed order: the max is exact in any order; exp-sums are taken per
    group of ATTN_KEYS keys, then added across groups in a fixed tree (tree_sum); the value sum likewise (a
    [rows, ATTN_KEYS] x [ATTN_KEYS, hd] product per group, then the tree). Hidden keys contribute exact zeros, so
    padding, and leaving a causal tail out, change nothing. The math is fp32 (bf16 scores and sums lost the
    embedded model its answers), and the matmuls stack a row's query heads with other rows (M = g·rows), at
    least MIN_ROWS of them: fp32 matmuls are row-invariant from M = 6 up (measured; MKL's small-M path rounds
    otherwise). SDPA blocks keys by the padded length and queries by the chunk: its rounding followed both."""
    b, nh, t, hd = q.shape
    nkv = k.shape[1]
    g, valid = nh // nkv, m.valid
    q5 = q.reshape(b, nkv, g, t, hd).float()  # query heads grouped by the KV head they share (GQA)
    sk = valid.shape[-1]
    kf, vf = (_fp32_keys(x, sk) for x in (k, v))  # [B, nkv, Sk, hd] fp32, zeros past the gathered keys
    parts = []
    for j, r0 in enumerate(range(0, t, ATTN_ROWS)):
        r, ng = min(ATTN_ROWS, t - r0), m.groups[j]
        sv, rows = ng * ATTN_KEYS, max(g * r, MIN_ROWS)
        qg = q5.new_zeros(b, nkv, rows, hd)  # zero rows pad a decode step's few to MIN_ROWS
        qg[:, :, :g * r] = q5[:, :, :, r0:r0 + r].reshape(b, nkv, g * r, hd)
        scores = torch.matmul(qg, kf[:, :, :sv].transpose(-1, -2))  # [B, nkv, rows, Sv]
        scores.mul_(hd ** -0.5 if scale is None else scale)
        scores[:, :, :g * r].view(b, nkv, g, r, sv).masked_fill_(~valid[:, None, None, r0:r0 + r, :sv], float("-inf"))
        scores[:, :, g * r:] = float("-inf")  # padding rows: no keys (their results are dropped)
        scores[:, :, g * r:, 0] = 0.0  # ...but one finite score, so they stay finite
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True)).view(b, nkv, rows, ng, ATTN_KEYS)
        z = tree_sum(e.sum(dim=-1), -1)[..., None]  # [B, nkv, rows, 1]
        pv = torch.matmul(e.transpose(2, 3), vf[:, :, :sv].reshape(b, nkv, ng, ATTN_KEYS, hd))  # [B, nkv, ng, rows, hd]
        parts.append(tree_sum(pv, 2)[:, :, :g * r].div_(z[:, :, :g * r]).view(b, nkv, g, r, hd))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)  # [B, nkv, g, T, hd] fp32
    return out.reshape(b, nh, t, hd).to(q.dtype)


def _fp32_keys(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, nkv, S, hd] as fp32 with its key dim cut or zero-padded to n: one copy, converting."""
    out = x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3], dtype=torch.float32) if x.shape[2] < n else \
        torch.empty(x.shape[0], x.shape[1], n, x.shape[3], dtype=torch.float32, device=x.device)
    m = min(n, x.shape[2])
    out[:, :, :m].copy_(x[:, :, :m])
    return out


def attention_mask(positions: torch.Tensor, s: int, window: int | None) -> torch.Tensor | None:
    """Bool [B, 1, T, S], True where the query at positions[b, i] may see key j (j <= position, and within
    the window); None when nothing is hidden: one sequence, one new token (callers read S = its position + 1
    keys), all of them in its window."""
    b, t = positions.shape
    if b == 1 and t == 1 and (window is None or s <= window):
        return None
    k_pos = torch.arange(s, device=positions.device)  # [S]
    q_pos = positions[:, :, None]  # [B, T, 1]
    mask = k_pos <= q_pos  # [B, T, S]
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask[:, None]
