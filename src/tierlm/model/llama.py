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
from tierlm.kvcache.attention import BlockMask, blocked_attention
from tierlm.memory.workspace import BufferSpec, Workspace
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


def rms_norm_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                  x32: torch.Tensor, sq32: torch.Tensor, var32: torch.Tensor) -> torch.Tensor:
    """RMSNorm of x [..., H] written into `out` [..., H] through scratch (x32, sq32 [..., H], var32 [..., 1] fp32):
    variance in fp32 whatever the compute dtype, the same operations as HF LlamaRMSNorm (x*x is pow(x, 2) bit
    for bit), so fp32 results equal HF's exactly."""
    xf = x if x.dtype == torch.float32 else x32.copy_(x)
    torch.mean(torch.mul(xf, xf, out=sq32), dim=-1, keepdim=True, out=var32)  # [..., 1]
    torch.mul(xf, var32.add_(eps).rsqrt_(), out=sq32)  # normalised, fp32
    return out.copy_(sq32).mul_(weight)  # weight * normalised.to(dtype), as HF


def norm_in_workspace(ws: Workspace, prefix: str, out: str, x: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """rms_norm_into with buffers `out` and `{prefix}_x32|sq32|var32` of the workspace: x [B, T, H] -> [B, T, H]."""
    f32 = torch.float32
    return rms_norm_into(ws.view(out, x.shape, x.dtype), x, weight, eps, ws.view(f"{prefix}_x32", x.shape, f32),
                         ws.view(f"{prefix}_sq32", x.shape, f32), ws.view(f"{prefix}_var32", (*x.shape[:-1], 1), f32))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
               tmp: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd]; cos/sin [B, 1, T, hd] or [T, hd] -> out [B, heads, T, hd] = x*cos + rotate_half(x)*sin
    (HF's formula; -(a*b) equals (-a)*b exactly, so the sign moves after the product bit for bit). tmp: scratch."""
    half = x.shape[-1] // 2
    torch.mul(x[..., half:], sin[..., :half], out=tmp[..., :half]).neg_()
    torch.mul(x[..., :half], sin[..., half:], out=tmp[..., half:])
    return torch.mul(x, cos, out=out).add_(tmp)


# Workspace buffers of one layer step, by op index (see layer_forward): (name, width per row, dtype, first, last).
# "act" is the compute dtype, "kv" the attention dtype. Kernel outputs (the matmuls, SDPA) are not here:
# torch's fused kernels have no out= form.
def workspace_buffers(cfg: ModelConfig, rows: int, act: torch.dtype, kv: torch.dtype,
                      native_bytes: int = 0) -> list[BufferSpec]:
    """The activation buffers of a layer step over `rows` = B*T token rows, with lifetimes for plan_workspace.
    native_bytes: the scratch of the native layer step (model/native_layer.py), which runs instead of ops 0-10: it is
    given op 11 alone, so it shares the arena's bytes with them."""
    h, qk, q = cfg.hidden_size, (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim, cfg.q_size
    f32 = torch.float32
    table = [("attn_x32", h, f32, 0, 0), ("attn_sq32", h, f32, 0, 0), ("attn_var32", 1, f32, 0, 0),
             ("h_attn", h, act, 0, 1),  # op 1: the qkv matmul
             ("rope_tmp", qk, act, 2, 2), ("qk", qk, act, 2, 4),  # op 3: KV write, op 4: attention
             ("q_kv", q, kv, 3, 4),  # q in the attention dtype
             ("attn", q, act, 5, 6),  # op 5: heads back to rows, op 6: the wo matmul
             ("ffn_x32", h, f32, 7, 7), ("ffn_sq32", h, f32, 7, 7), ("ffn_var32", 1, f32, 7, 7),
             ("h_ffn", h, act, 7, 8),  # op 8: the gate/up matmul
             ("ffn_act", cfg.intermediate_size, act, 9, 10)]  # op 9: silu(gate)*up, op 10: the down matmul
    native = [BufferSpec("native", native_bytes, 11, 11)] if native_bytes else []
    return [BufferSpec(n, rows * width * dt.itemsize, a, b) for n, width, dt, a, b in table] + native


def layer_forward(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv, ws: Workspace, exact: bool = False) -> torch.Tensor:
    """One decoder layer. x [B, T, H] is the residual stream: updated in place and returned. cos, sin
    [B, 1, T, hd] at each token's position. `kv` is this layer's view of the step (kvcache/: update(k, v));
    `ws` holds the intermediates (workspace_buffers, planned for >= B*T rows); exact: see kernels.linear.
    (tierlm/native/csrc/layer.cpp is this function in one native call, for quantised layers.)"""
    b, t, _ = x.shape
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps = cfg.rms_norm_eps

    h = norm_in_workspace(ws, "attn", "h_attn", x, w.attn_norm, eps)  # op 0: [B, T, H]
    qkv = linear(h, w.wqkv, w.bqkv, exact).view(b, t, nh + 2 * nkv, hd).transpose(1, 2)  # op 1: [B, nh+2*nkv, T, hd]
    # op 2: q and k heads are adjacent: one rope application for both (fewer small ops per decode step)
    shape = (b, nh + nkv, t, hd)
    qk = apply_rope(qkv[:, :nh + nkv], cos, sin, ws.view("qk", shape, x.dtype), ws.view("rope_tmp", shape, x.dtype))
    q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]  # [B, nh|nkv|nkv, T, hd]
    # op 3: store k, v; read back every stored key [B, nkv, S, hd] in the attention dtype, and the mask
    # ([T, S] or [B, 1, T, S]: causal, sliding window, padding of shorter sequences; None when nothing is hidden).
    # The engine's steps get a BlockMask instead: keys in whole KV blocks, attended with fixed-shape
    # reductions (blocked_attention), so no row depends on what else is in the step.
    k_all, v_all, mask = kv.update(k, v)
    if q.dtype != k_all.dtype:  # attention runs in the KV dtype (config.attention_dtype)
        q = ws.view("q_kv", q.shape, k_all.dtype).copy_(q)
    if isinstance(mask, BlockMask):
        attn = blocked_attention(q, k_all, v_all, mask)  # op 4: [B, nh, T, hd]
    else:
        attn = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=nkv != nh)  # op 4: [B, nh, T, hd]
    rows = ws.view("attn", (b, t, nh, hd), x.dtype).copy_(attn.transpose(1, 2))  # op 5: [B, T, nh, hd]
    x.add_(linear(rows.view(b, t, nh * hd), w.wo, w.bo, exact))  # op 6: [B, T, H]

    h = norm_in_workspace(ws, "ffn", "h_ffn", x, w.ffn_norm, eps)  # op 7: [B, T, H]
    gate, up = linear(h, w.w_gateup, exact=exact).chunk(2, dim=-1)  # op 8: [B, T, I] each
    act = torch.mul(F.silu(gate, inplace=True), up, out=ws.view("ffn_act", gate.shape, x.dtype))  # op 9: [B, T, I]
    return x.add_(linear(act, w.w_down, exact=exact))  # op 10: [B, T, H]


def head(cfg: ModelConfig, norm: torch.Tensor, lm_head: Matrix, x: torch.Tensor, ws: Workspace,
         exact: bool = False) -> torch.Tensor:
    """x [B, T, H], norm [H], lm_head [V, H] -> logits [B, T, V] in fp32. Runs after every layer op, so it
    may use the attention-norm buffers of the workspace."""
    h = norm_in_workspace(ws, "attn", "h_attn", x, norm, cfg.rms_norm_eps)  # [B, T, H]
    return linear(h, lm_head, exact=exact).float()
