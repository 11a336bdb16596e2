"""Qwen3 (HF Qwen3ForCausalLM, GGUF "qwen3"): Qwen2 without the q/k/v biases, and an RMSNorm over each q and k
head (weights [hd]) before rope. head_dim comes from the file (Qwen3 heads are not hidden_size / num_heads).

  (a) configuration  Llama's tables (model/llama.py), with Qwen3's bias and sliding-window keys
  (b) tensors        Llama's, plus attn_q_norm / attn_k_norm
  (c) forward        layer_forward: Llama's with the q/k head norms; head: Llama's

Shapes: B batch, T new tokens, S keys in the KV cache after this step, H hidden, V vocab, nh query heads,
nkv kv heads, hd head dim, I intermediate. Weights are [out, in]. Matches HF transformers op for op as llama.py
does (tests/test_parity_archs.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierlm.config import ModelConfig
from tierlm.memory.workspace import BufferSpec, Workspace
from tierlm.model import llama
from tierlm.model.family import FieldDecl, Matrix, NativeExtras, TensorDecl
from tierlm.model.ops import apply_rope, attend, head_norm_in_workspace, norm_in_workspace
from tierlm.quant.kernels import linear

# --- (a) configuration -----------------------------------------------------------------------------------------
GGUF_ARCHS = HF_MODEL_TYPES = {"qwen3": "qwen3"}
GGUF_WRITTEN_AS = {"qwen3": "qwen3"}
HF_CLASSES = {"qwen3": "Qwen3ForCausalLM"}
PERMUTED_QK_ARCHS: frozenset[str] = frozenset()  # llama.cpp's converter keeps HF's (NeoX) row order for Qwen
NATIVE_LAYER_STEP = True  # native/csrc/layer.cpp with the q/k norms (native_extras)

GGUF_CONFIG = llama.GGUF_CONFIG  # head_dim from attention.key_length; biases from the tensors present
HF_CONFIG = {
    **llama.HF_CONFIG,
    "sliding_window": lambda src, f: None,  # refused below when used
    "attention_bias": lambda src, f: bool(src.get("attention_bias", False)),
}
HF_REFUSED = {**llama.HF_REFUSED,
              "use_sliding_window": "Qwen3 sliding-window layers (use_sliding_window=true) are not supported"}

# --- (b) tensors -----------------------------------------------------------------------------------------------
GLOBAL_TENSORS = tuple(t for t in llama.GLOBAL_TENSORS if t.name != "rope_freqs")
_QK_NORMS = (
    TensorDecl("q_norm", "attn_q_norm.weight", "self_attn.q_norm.weight", lambda c: (c.head_dim,)),
    TensorDecl("k_norm", "attn_k_norm.weight", "self_attn.k_norm.weight", lambda c: (c.head_dim,)),
)
LAYER_TENSORS = (*llama.LAYER_TENSORS[:9], *_QK_NORMS, *llama.LAYER_TENSORS[9:])  # the norms after the attention's
LAYER_FIELDS = (*llama.LAYER_FIELDS[:4], FieldDecl("q_norm"), FieldDecl("k_norm"), *llama.LAYER_FIELDS[4:])


@dataclass
class LayerWeights:  # LAYER_FIELDS, by name
    attn_norm: torch.Tensor  # [H]
    wqkv: Matrix  # [(nh + 2*nkv)*hd, H]: q, k, v rows stacked (one matmul)
    q_norm: torch.Tensor  # [hd]
    k_norm: torch.Tensor  # [hd]
    wo: Matrix  # [H, nh*hd]
    ffn_norm: torch.Tensor  # [H]
    w_gateup: Matrix  # [2*I, H]: gate rows then up rows (one matmul)
    w_down: Matrix  # [H, I]
    bqkv: torch.Tensor | None = None  # [(nh + 2*nkv)*hd]   (attention_bias)
    bo: torch.Tensor | None = None  # [H]                   (attention_bias)


# --- (c) forward -----------------------------------------------------------------------------------------------
def workspace_buffers(cfg: ModelConfig, rows: int, act: torch.dtype, kv: torch.dtype,
                      native_bytes: int = 0) -> list[BufferSpec]:
    """The activation buffers of a layer step over `rows` token rows, by op index of layer_forward."""
    h, heads, q = cfg.hidden_size, cfg.num_heads + cfg.num_kv_heads, cfg.q_size
    qk, f32 = heads * cfg.head_dim, torch.float32
    table = [("attn_x32", h, f32, 0, 0), ("attn_sq32", h, f32, 0, 0), ("attn_var32", 1, f32, 0, 0),
             ("h_attn", h, act, 0, 1),  # op 1: the qkv matmul
             ("qkn_x32", qk, f32, 2, 2), ("qkn_sq32", qk, f32, 2, 2), ("qkn_var32", heads, f32, 2, 2),
             ("qkn", qk, act, 2, 3),  # op 2: the q/k head norms, op 3: rope
             ("rope_tmp", qk, act, 3, 3), ("qk", qk, act, 3, 5),  # op 4: KV write, op 5: attention
             ("q_kv", q, kv, 4, 5), ("attn", q, act, 6, 7),  # op 6: heads back to rows, op 7: the wo matmul
             ("ffn_x32", h, f32, 8, 8), ("ffn_sq32", h, f32, 8, 8), ("ffn_var32", 1, f32, 8, 8),
             ("h_ffn", h, act, 8, 9),  # op 9: the gate/up matmul
             ("ffn_act", cfg.intermediate_size, act, 10, 11)]  # op 10: silu(gate)*up, op 11: the down matmul
    native = [BufferSpec("native", native_bytes, 12, 12)] if native_bytes else []  # runs instead of ops 0-11
    return [BufferSpec(n, rows * width * dt.itemsize, a, b) for n, width, dt, a, b in table] + native


def layer_forward(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv, ws: Workspace, exact: bool = False) -> torch.Tensor:
    """One decoder layer: x [B, T, H] (the residual stream) updated in place and returned; see llama.layer_forward."""
    b, t, _ = x.shape
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps = cfg.rms_norm_eps

    h = norm_in_workspace(ws, "attn", "h_attn", x, w.attn_norm, eps)  # op 0: [B, T, H]
    qkv = linear(h, w.wqkv, w.bqkv, exact).view(b, t, nh + 2 * nkv, hd)  # op 1: [B, T, nh+2*nkv, hd]
    qkn = ws.view("qkn", (b, t, nh + nkv, hd), x.dtype)  # op 2: q heads then k heads, each RMS-normed over hd
    head_norm_in_workspace(ws, qkn[:, :, :nh], qkv[:, :, :nh], w.q_norm, eps)
    head_norm_in_workspace(ws, qkn[:, :, nh:], qkv[:, :, nh:nh + nkv], w.k_norm, eps)
    shape = (b, nh + nkv, t, hd)  # op 3: one rope application for q and k
    qk = apply_rope(qkn.transpose(1, 2), cos, sin, ws.view("qk", shape, x.dtype), ws.view("rope_tmp", shape, x.dtype))
    q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, :, nh + nkv:].transpose(1, 2)  # [B, nh|nkv|nkv, T, hd]
    attn = attend(ws, q, k, v, kv)  # op 4: store k, v; op 5: attend (see ops.attend): [B, nh, T, hd]
    rows = ws.view("attn", (b, t, nh, hd), x.dtype).copy_(attn.transpose(1, 2))  # op 6: [B, T, nh, hd]
    x.add_(linear(rows.view(b, t, nh * hd), w.wo, w.bo, exact))  # op 7: [B, T, H]

    h = norm_in_workspace(ws, "ffn", "h_ffn", x, w.ffn_norm, eps)  # op 8: [B, T, H]
    gate, up = linear(h, w.w_gateup, exact=exact).chunk(2, dim=-1)  # op 9: [B, T, I] each
    act = torch.mul(F.silu(gate, inplace=True), up, out=ws.view("ffn_act", gate.shape, x.dtype))  # op 10
    return x.add_(linear(act, w.w_down, exact=exact))  # op 11: [B, T, H]


def native_extras(cfg: ModelConfig, w: LayerWeights, layer: int) -> NativeExtras:
    return NativeExtras(w.q_norm, w.k_norm, bqkv=w.bqkv, bo=w.bo)  # Llama's layer with its q/k head norms


head = llama.head
rope_inv_freqs, layer_rope, embed_scale = llama.rope_inv_freqs, llama.layer_rope, llama.embed_scale


def gguf_metadata(cfg: ModelConfig) -> dict[str, int | float]:
    return {"attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim}  # hd != H / nh
