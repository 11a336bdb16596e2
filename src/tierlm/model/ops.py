"""The Llama family's arithmetic helpers: rope (inverse frequencies, cos/sin tables, rotate-half) and RMSNorm, each
op for op as HF transformers computes it, so fp32 results agree bit for bit (model/llama.py uses them).

Shapes: T tokens, hd head dim, H hidden.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tierlm.config import ModelConfig
from tierlm.kvcache.attention import BlockMask, blocked_attention
from tierlm.memory.workspace import Workspace


def rope_inv_freq(cfg: ModelConfig, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """[hd/2] fp32 inverse frequencies, with linear or llama3 scaling applied (as HF rope_init_fn)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # [hd/2]
    rs = cfg.rope_scaling
    if rope_freqs is not None:  # llama3 GGUF: factors already computed by the converter
        return inv_freq / rope_freqs.float().cpu()
    if rs.kind == "linear":
        return inv_freq / rs.factor
    if rs.kind == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_positions, hd] in `dtype`, computed in fp32 like HF."""
    pos = torch.arange(max_positions, dtype=torch.float32)  # [P]
    freqs = torch.outer(pos, inv_freq)  # [P, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rms_norm_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                  x32: torch.Tensor, sq32: torch.Tensor, var32: torch.Tensor,
                  fp32_weight: bool = False) -> torch.Tensor:
    """RMSNorm of x [..., H] written into `out` [..., H] through scratch (x32, sq32 [..., H], var32 [..., 1] fp32):
    variance in fp32 whatever the compute dtype, the same operations as HF LlamaRMSNorm (x*x is pow(x, 2) bit
    for bit), so fp32 results equal HF's exactly. fp32_weight: the weight multiplies in fp32 before the cast
    (HF Gemma3RMSNorm), not after it (Llama)."""
    xf = x if x.dtype == torch.float32 else x32.copy_(x)
    torch.mean(torch.mul(xf, xf, out=sq32), dim=-1, keepdim=True, out=var32)  # [..., 1]
    torch.mul(xf, var32.add_(eps).rsqrt_(), out=sq32)  # normalised, fp32
    if fp32_weight:
        return out.copy_(sq32.mul_(weight))
    return out.copy_(sq32).mul_(weight)  # weight * normalised.to(dtype), as HF


def norm_in_workspace(ws: Workspace, prefix: str, out: str, x: torch.Tensor, weight: torch.Tensor,
                      eps: float, fp32_weight: bool = False) -> torch.Tensor:
    """rms_norm_into with buffers `out` and `{prefix}_x32|sq32|var32` of the workspace: x [B, T, H] -> [B, T, H]."""
    f32 = torch.float32
    return rms_norm_into(ws.view(out, x.shape, x.dtype), x, weight, eps, ws.view(f"{prefix}_x32", x.shape, f32),
                         ws.view(f"{prefix}_sq32", x.shape, f32), ws.view(f"{prefix}_var32", (*x.shape[:-1], 1), f32),
                         fp32_weight)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
               tmp: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd]; cos/sin [B, 1, T, hd] or [T, hd] -> out [B, heads, T, hd] = x*cos + rotate_half(x)*sin
    (HF's formula; -(a*b) equals (-a)*b exactly, so the sign moves after the product bit for bit). tmp: scratch."""
    half = x.shape[-1] // 2
    torch.mul(x[..., half:], sin[..., :half], out=tmp[..., :half]).neg_()
    torch.mul(x[..., :half], sin[..., half:], out=tmp[..., half:])
    return torch.mul(x, cos, out=out).add_(tmp)


def head_norm_in_workspace(ws: Workspace, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                           fp32_weight: bool = False) -> torch.Tensor:
    """rms_norm_into over the head dim of x [B, T, heads, hd] (a view of the qkv matmul's output) into `out`
    (a view of the same shape), with the workspace's qkn_x32|sq32|var32 scratch: the per-head q/k norms of Qwen3
    and Gemma 3. weight [hd]."""
    f32 = torch.float32
    return rms_norm_into(out, x, weight, eps, ws.view("qkn_x32", x.shape, f32), ws.view("qkn_sq32", x.shape, f32),
                         ws.view("qkn_var32", (*x.shape[:-1], 1), f32), fp32_weight)


def attend(ws: Workspace, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv, window: int | None = None,
           scale: float | None = None) -> torch.Tensor:
    """Store k, v and attend: q [B, nh, T, hd], k, v [B, nkv, T, hd] -> [B, nh, T, hd] in the attention dtype.
    kv.update reads back every stored key [B, nkv, S, hd] with the step's mask: a BlockMask for the engine's steps
    (keys in whole KV blocks, fixed-shape reductions: no row depends on what else is in the step), else an SDPA
    mask ([T, S] or [B, 1, T, S]: causal, sliding window, padding; None when nothing is hidden). window: a local
    layer's own; scale: the scores' (None: hd ** -0.5). q is copied into the KV dtype ("q_kv") where it differs:
    attention runs in it (config.attention_dtype)."""
    k_all, v_all, mask = kv.update(k, v) if window is None else kv.update(k, v, window=window)
    if q.dtype != k_all.dtype:
        q = ws.view("q_kv", q.shape, k_all.dtype).copy_(q)
    if isinstance(mask, BlockMask):
        return blocked_attention(q, k_all, v_all, mask, scale)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1],
                                          scale=scale)
