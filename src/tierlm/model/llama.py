"""The Llama-family forward pass (Llama 2/3, SmolLM2, Mistral, Qwen2), one decoder layer at a time.

Shapes: B batch, T new tokens, S tokens in the KV cache after this step, H hidden, V vocab,
nh query heads, nkv kv heads, hd head dim, I intermediate. Weights are [out, in] (torch Linear layout).
The runner owns the layer loop and weight residency; this file owns only arithmetic, and matches HF
transformers op for op (RMSNorm in fp32, rotate-half rope, SDPA attention) so fp32 logits agree to 1e-6.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierlm.config import ModelConfig
from tierlm.quant.kernels import linear
from tierlm.quant.tensor import QuantTensor


Matrix = torch.Tensor | QuantTensor  # dense, or weight-only int8/int4 (quant/); kernels.linear takes both


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wqkv: Matrix  # [(nh + 2*nkv)*hd, H]: q, k, v rows stacked (one matmul)
    wo: Matrix  # [H, nh*hd]
    ffn_norm: torch.Tensor  # [H]
    w_gateup: Matrix  # [2*I, H]: gate rows then up rows (one matmul)
    w_down: Matrix  # [H, I]
    bqkv: torch.Tensor | None = None  # [(nh + 2*nkv)*hd]   (Qwen2)
    bo: torch.Tensor | None = None  # [H]       (Llama with attention_bias)


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] -> [..., H]; variance in fp32 whatever the compute dtype (as HF LlamaRMSNorm)."""
    # torch.rms_norm computes x * rsqrt(mean(x^2) + eps) as HF does (bit-identical in fp32), in one op
    return weight * torch.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd]; cos/sin [T, hd] -> [B, heads, T, hd]."""
    return x * cos + _rotate_half(x) * sin


def attention_mask(start_pos: int, t: int, s: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Bool [T, S], True where query (start_pos + i) may attend key j; None when no masking is needed."""
    if t == 1 and (window is None or s <= window):
        return None  # one new token attends everything cached
    q_pos = torch.arange(start_pos, start_pos + t, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(s, device=device)[None, :]  # [1, S]
    mask = k_pos <= q_pos  # [T, S]
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def layer_forward(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv, start_pos: int) -> torch.Tensor:
    """One decoder layer. x [B, T, H] -> [B, T, H]. `kv` stores this layer's K/V (see kvcache/)."""
    b, t, _ = x.shape
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    h = rms_norm(x, w.attn_norm, cfg.rms_norm_eps)  # [B, T, H]
    qkv = linear(h, w.wqkv, w.bqkv).view(b, t, nh + 2 * nkv, hd).transpose(1, 2)  # [B, nh+2*nkv, T, hd]
    # q and k heads are adjacent: one rope application for both (fewer small ops per decode step)
    qk = apply_rope(qkv[:, :nh + nkv], cos, sin)  # [B, nh+nkv, T, hd]
    q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]  # [B, nh|nkv|nkv, T, hd]
    k_all, v_all = kv.update(start_pos, k, v)  # [B, nkv, S, hd] each, S = start_pos + T, in the KV dtype
    mask = attention_mask(start_pos, t, k_all.shape[2], cfg.sliding_window, x.device)  # [T, S] | None
    # attention runs in the KV dtype (fp32 for a bf16 run on CPUs without native bf16: config.attention_dtype)
    attn = F.scaled_dot_product_attention(q.to(k_all.dtype), k_all, v_all, attn_mask=mask,
                                          enable_gqa=nkv != nh)  # [B, nh, T, hd]
    attn = attn.transpose(1, 2).reshape(b, t, nh * hd).to(x.dtype)  # [B, T, nh*hd]
    x = x + linear(attn, w.wo, w.bo)  # [B, T, H]

    h = rms_norm(x, w.ffn_norm, cfg.rms_norm_eps)  # [B, T, H]
    gate, up = linear(h, w.w_gateup).chunk(2, dim=-1)  # [B, T, I] each
    return x + linear(F.silu(gate) * up, w.w_down)  # [B, T, H]


def head(cfg: ModelConfig, norm: torch.Tensor, lm_head: Matrix, x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H], norm [H], lm_head [V, H] -> logits [B, T, V] in fp32."""
    return linear(rms_norm(x, norm, cfg.rms_norm_eps), lm_head).float()
