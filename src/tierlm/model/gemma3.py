"""Gemma 3, text only (HF Gemma3ForCausalLM, model_type gemma3_text; GGUF "gemma3").

What differs from Llama (model/llama.py):
  - the embedding rows are multiplied by sqrt(H) in the compute dtype (embed_scale; the runner applies it)
  - RMSNorm multiplies by (1 + w), in fp32 before the cast. llama.cpp's converter stores 1 + w in the GGUF; the HF
    loader adds the 1 (TensorDecl.hf_shift), so the forward multiplies by the stored weight whatever the format
  - four norms per layer: before and after attention (input / post_attention), before and after the FFN
    (pre_feedforward / post_feedforward); the post norms apply to the sublayer's output before the residual add
  - an RMSNorm over each q and k head (weights [hd]) before rope; scores scaled by query_pre_attn_scalar ** -0.5
  - GeGLU: gelu_tanh(gate) * up
  - local and global layers: every global_every-th layer (6: layers 5, 11, 17, ...) attends to every key with
    the file's rope base and scaling; the others only to the last local_window keys, with rope base
    local_rope_theta (10000) and no scaling. The KV cache keeps every token for all layers (the global ones need
    them): a local layer hides the older keys with its mask (PagedStep.windowed_mask), memory is not saved yet
  - a tied head by default; final logit softcapping when the config has one (Gemma 3 does not)

Shapes: B batch, T new tokens, S keys in the KV cache after this step, H hidden, V vocab, nh query heads,
nkv kv heads, hd head dim, I intermediate. Weights are [out, in].
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from tierlm.config import ModelConfig, RopeScaling
from tierlm.errors import UnsupportedModelError
from tierlm.memory.workspace import BufferSpec, Workspace
from tierlm.model import llama
from tierlm.model.family import ConfigKey, ConfigSource, FieldDecl, Matrix, NativeExtras, TensorDecl
from tierlm.model.ops import apply_rope, attend, head_norm_in_workspace, norm_in_workspace, rope_inv_freq
from tierlm.quant.kernels import linear

# --- (a) configuration -----------------------------------------------------------------------------------------
GGUF_ARCHS = {"gemma3": "gemma3"}
HF_MODEL_TYPES = {"gemma3_text": "gemma3"}
GGUF_WRITTEN_AS = {"gemma3_text": "gemma3"}
HF_CLASSES = {"gemma3_text": "Gemma3ForCausalLM"}
PERMUTED_QK_ARCHS: frozenset[str] = frozenset()  # llama.cpp ropes Gemma NeoX style: rows as in HF
# native/csrc/layer.cpp computes this layer (native_extras: the q/k and post norms, GeGLU, the window; tested against
# the Python layer), but is not the default yet: it decodes Gemma 3 270M Q4_K_M 1.8x faster, yet with int8
# activations this model's perplexity moves with any change of rounding order (llama-perplexity's scheme, 3
# windows of 512: fp32 activations 8.4159 on both paths; GGUF blocks 8.614 Python, 8.788 native, llama.cpp 8.655;
# int8 g32 8.480 Python, 8.429 native), and the native draw is 1.5% past llama.cpp's.
NATIVE_LAYER_STEP = False
GLOBAL_EVERY = 6  # Gemma 3's sliding_window_pattern: llama.cpp hard-codes it for "gemma3" GGUF files
LOCAL_ROPE_THETA = 10000.0  # likewise (rope_local_base_freq)


def _gguf_pattern(src: ConfigSource, fields: dict[str, Any]) -> int:
    """Newer converters write attention.sliding_window_pattern (one flag per layer, True: local); older ones
    nothing, and llama.cpp uses 6."""
    flags = src.get("attention.sliding_window_pattern")
    if flags is None:
        return GLOBAL_EVERY
    return _pattern_of([bool(f) for f in flags])


def _pattern_of(local: list[bool]) -> int:
    """The N of "every Nth layer global" from per-layer flags (True: local); other layouts are refused."""
    n = next((i + 1 for i, is_local in enumerate(local) if not is_local), len(local) + 1)
    if any(is_local == ((i + 1) % n == 0) for i, is_local in enumerate(local)):
        raise UnsupportedModelError(f"a layout of local/global layers other than every Nth global ({local})")
    return n


def _gguf_query_scalar(src: ConfigSource, fields: dict[str, Any]) -> float:
    # as llama.cpp: Gemma 3 27B (62 layers) scales by hidden/heads, every other size by head_dim
    if fields["num_layers"] == 62:
        return fields["hidden_size"] / fields["num_heads"]
    return float(fields["head_dim"])


GGUF_CONFIG = {
    **llama.GGUF_CONFIG,
    "attention_bias": lambda src, f: False,
    "rope_theta": ConfigKey("rope.freq_base", float, 1000000.0),
    "sliding_window": lambda src, f: None,  # the cache keeps every token: the global layers read them all
    "local_window": ConfigKey("attention.sliding_window"),
    "global_every": _gguf_pattern,
    "local_rope_theta": ConfigKey("rope.freq_base_swa", float, LOCAL_ROPE_THETA),
    "query_pre_attn_scalar": _gguf_query_scalar,
    "final_logit_softcapping": ConfigKey("final_logit_softcapping", None, None),
}


def _hf_rope(src: ConfigSource, layer_type: str) -> dict[str, Any]:
    """transformers >= 5: rope_parameters per layer type; older configs: rope_theta, rope_scaling and
    rope_local_base_freq at the top level."""
    params = src.get("rope_parameters") or {}
    if layer_type in params:
        return params[layer_type] or {}
    if layer_type == "full_attention":
        return {**(src.get("rope_scaling") or {}), "rope_theta": src.get("rope_theta", 1000000.0)}
    return {"rope_theta": src.get("rope_local_base_freq", LOCAL_ROPE_THETA)}


def _hf_local_theta(src: ConfigSource, fields: dict[str, Any]) -> float:
    params = _hf_rope(src, "sliding_attention")
    if params.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"local-layer rope scaling {params['rope_type']!r} is not supported")
    return float(params.get("rope_theta", LOCAL_ROPE_THETA))


def _hf_pattern(src: ConfigSource, fields: dict[str, Any]) -> int:
    types = src.get("layer_types")
    if types is None:
        return int(src.get("sliding_window_pattern", GLOBAL_EVERY))
    return _pattern_of([t == "sliding_attention" for t in types])


def _hf_hidden(src: ConfigSource, fields: dict[str, Any]) -> int:
    """hidden_size, once the FFN's activation is known to be the one this file computes."""
    act = src.get("hidden_activation") or src.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModelError(f"Gemma 3 activation {act!r} is not supported (supported: gelu_pytorch_tanh)")
    return int(src.get("hidden_size"))


HF_CONFIG = {
    "hidden_size": _hf_hidden,
    "num_heads": ConfigKey("num_attention_heads"),
    "rope_theta": lambda src, f: float(_hf_rope(src, "full_attention").get("rope_theta", 1000000.0)),
    "rope_scaling": lambda src, f: llama.rope_scaling_of(_hf_rope(src, "full_attention")),
    "sliding_window": lambda src, f: None,
    "local_window": ConfigKey("sliding_window", default=4096),
    "global_every": _hf_pattern,
    "local_rope_theta": _hf_local_theta,
    "query_pre_attn_scalar": ConfigKey("query_pre_attn_scalar", float, 256.0),
    "final_logit_softcapping": ConfigKey("final_logit_softcapping", None, None),
    "vocab_size": ConfigKey("vocab_size"),
    "intermediate_size": ConfigKey("intermediate_size"),
    "num_layers": ConfigKey("num_hidden_layers"),
    "num_kv_heads": ConfigKey("num_key_value_heads", default=lambda f: f["num_heads"]),
    "head_dim": ConfigKey("head_dim", default=256),
    "max_position_embeddings": ConfigKey("max_position_embeddings", default=131072),
    "rms_norm_eps": ConfigKey("rms_norm_eps", float, 1e-6),
    "attention_bias": lambda src, f: False,
    "tie_word_embeddings": ConfigKey("tie_word_embeddings", bool, True),
}
HF_REFUSED = {
    "attention_bias": "Gemma 3 attention biases (attention_bias=true) are not supported",
    "attn_logit_softcapping": "attention logit softcapping (Gemma 2) is not supported",
    "use_bidirectional_attention": "bidirectional attention (use_bidirectional_attention=true) is not supported",
}


# --- (b) tensors -----------------------------------------------------------------------------------------------
def _norm(name: str, gguf: str, hf: str, width=lambda c: c.hidden_size, **kw) -> TensorDecl:
    """A (1 + w) RMSNorm weight: stored with its 1 in GGUF, without it in HF (hf_shift)."""
    return TensorDecl(name, gguf, hf, lambda c: (width(c),), hf_shift=1.0, **kw)


GLOBAL_TENSORS = (
    TensorDecl("embed", "token_embd.weight", "model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size),
               matrix=True),
    _norm("norm", "output_norm.weight", "model.norm.weight", after_layers=True),
    TensorDecl("lm_head", "output.weight", "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), matrix=True,
               present=lambda c: not c.tie_word_embeddings, after_layers=True),  # absent when tied
)
_HEAD = lambda c: c.head_dim  # noqa: E731
LAYER_TENSORS = (
    _norm("attn_norm", "attn_norm.weight", "input_layernorm.weight"),
    TensorDecl("wq", "attn_q.weight", "self_attn.q_proj.weight", lambda c: (c.q_size, c.hidden_size), matrix=True),
    TensorDecl("wk", "attn_k.weight", "self_attn.k_proj.weight", lambda c: (c.kv_size, c.hidden_size), matrix=True),
    TensorDecl("wv", "attn_v.weight", "self_attn.v_proj.weight", lambda c: (c.kv_size, c.hidden_size), matrix=True),
    _norm("q_norm", "attn_q_norm.weight", "self_attn.q_norm.weight", _HEAD),
    _norm("k_norm", "attn_k_norm.weight", "self_attn.k_norm.weight", _HEAD),
    TensorDecl("wo", "attn_output.weight", "self_attn.o_proj.weight", lambda c: (c.hidden_size, c.q_size),
               matrix=True),
    _norm("post_attn_norm", "post_attention_norm.weight", "post_attention_layernorm.weight"),
    _norm("ffn_norm", "ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    TensorDecl("w_gate", "ffn_gate.weight", "mlp.gate_proj.weight", lambda c: (c.intermediate_size, c.hidden_size),
               matrix=True),
    TensorDecl("w_up", "ffn_up.weight", "mlp.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size),
               matrix=True),
    TensorDecl("w_down", "ffn_down.weight", "mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size),
               matrix=True),
    _norm("post_ffn_norm", "post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
)
LAYER_FIELDS = (
    FieldDecl("attn_norm"), FieldDecl("wqkv", ("wq", "wk", "wv")), FieldDecl("q_norm"), FieldDecl("k_norm"),
    FieldDecl("wo"), FieldDecl("post_attn_norm"), FieldDecl("ffn_norm"), FieldDecl("w_gateup", ("w_gate", "w_up")),
    FieldDecl("w_down"), FieldDecl("post_ffn_norm"),
)


@dataclass
class LayerWeights:  # LAYER_FIELDS, by name; every norm weight holds its 1 (1 + w)
    attn_norm: torch.Tensor  # [H]
    wqkv: Matrix  # [(nh + 2*nkv)*hd, H]: q, k, v rows stacked (one matmul)
    q_norm: torch.Tensor  # [hd]
    k_norm: torch.Tensor  # [hd]
    wo: Matrix  # [H, nh*hd]
    post_attn_norm: torch.Tensor  # [H]
    ffn_norm: torch.Tensor  # [H]
    w_gateup: Matrix  # [2*I, H]: gate rows then up rows (one matmul)
    w_down: Matrix  # [H, I]
    post_ffn_norm: torch.Tensor  # [H]


# --- (c) forward -----------------------------------------------------------------------------------------------
def workspace_buffers(cfg: ModelConfig, rows: int, act: torch.dtype, kv: torch.dtype,
                      native_bytes: int = 0) -> list[BufferSpec]:
    """The activation buffers of a layer step over `rows` token rows, by op index of layer_forward. The norms'
    fp32 scratch ("n_*", also the head's) serves each norm in turn, so it lives through the whole step."""
    h, heads, q = cfg.hidden_size, cfg.num_heads + cfg.num_kv_heads, cfg.q_size
    qk, f32 = heads * cfg.head_dim, torch.float32
    table = [("n_x32", h, f32, 0, 13), ("n_sq32", h, f32, 0, 13), ("n_var32", 1, f32, 0, 13),
             ("h_attn", h, act, 0, 1),  # op 1: the qkv matmul
             ("qkn_x32", qk, f32, 2, 2), ("qkn_sq32", qk, f32, 2, 2), ("qkn_var32", heads, f32, 2, 2),
             ("qkn", qk, act, 2, 3),  # op 2: the q/k head norms, op 3: rope
             ("rope_tmp", qk, act, 3, 3), ("qk", qk, act, 3, 5),  # op 4: KV write, op 5: attention
             ("q_kv", q, kv, 4, 5), ("attn", q, act, 6, 7),  # op 6: heads back to rows, op 7: the wo matmul
             ("h_post", h, act, 8, 8),  # op 8: post-attention norm, added to x
             ("h_ffn", h, act, 9, 10),  # op 9: pre-FFN norm, op 10: the gate/up matmul
             ("ffn_act", cfg.intermediate_size, act, 11, 12),  # op 11: gelu(gate)*up, op 12: the down matmul
             ("h_post2", h, act, 13, 13)]  # op 13: post-FFN norm, added to x
    native = [BufferSpec("native", native_bytes, 14, 14)] if native_bytes else []  # runs instead of ops 0-13
    return [BufferSpec(n, rows * width * dt.itemsize, a, b) for n, width, dt, a, b in table] + native


def _norm_into(ws: Workspace, out: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return norm_in_workspace(ws, "n", out, x, weight, eps, fp32_weight=True)


def layer_forward(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv, ws: Workspace, exact: bool = False) -> torch.Tensor:
    """One decoder layer: x [B, T, H] (the residual stream) updated in place and returned. cos, sin [B, 1, T, hd]
    of this layer's rope (layer_rope); kv, ws, exact: as llama.layer_forward."""
    b, t, _ = x.shape
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps = cfg.rms_norm_eps

    h = _norm_into(ws, "h_attn", x, w.attn_norm, eps)  # op 0: [B, T, H]
    qkv = linear(h, w.wqkv, exact=exact).view(b, t, nh + 2 * nkv, hd)  # op 1: [B, T, nh+2*nkv, hd]
    qkn = ws.view("qkn", (b, t, nh + nkv, hd), x.dtype)  # op 2: q heads then k heads, each RMS-normed over hd
    head_norm_in_workspace(ws, qkn[:, :, :nh], qkv[:, :, :nh], w.q_norm, eps, fp32_weight=True)
    head_norm_in_workspace(ws, qkn[:, :, nh:], qkv[:, :, nh:nh + nkv], w.k_norm, eps, fp32_weight=True)
    shape = (b, nh + nkv, t, hd)  # op 3: one rope application for q and k
    qk = apply_rope(qkn.transpose(1, 2), cos, sin, ws.view("qk", shape, x.dtype), ws.view("rope_tmp", shape, x.dtype))
    q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, :, nh + nkv:].transpose(1, 2)  # [B, nh|nkv|nkv, T, hd]
    # op 4: store k, v; op 5: attend (ops.attend): a local layer's mask hides keys past its window
    attn = attend(ws, q, k, v, kv, window=cfg.local_window if cfg.is_local(kv.i) else None,
                  scale=(cfg.query_pre_attn_scalar or hd) ** -0.5)  # [B, nh, T, hd]
    rows = ws.view("attn", (b, t, nh, hd), x.dtype).copy_(attn.transpose(1, 2))  # op 6: [B, T, nh, hd]
    o = linear(rows.view(b, t, nh * hd), w.wo, exact=exact)  # op 7: [B, T, H]
    x.add_(_norm_into(ws, "h_post", o, w.post_attn_norm, eps))  # op 8: [B, T, H]

    h = _norm_into(ws, "h_ffn", x, w.ffn_norm, eps)  # op 9: [B, T, H]
    gate, up = linear(h, w.w_gateup, exact=exact).chunk(2, dim=-1)  # op 10: [B, T, I] each
    act = torch.mul(F.gelu(gate, approximate="tanh"), up, out=ws.view("ffn_act", gate.shape, x.dtype))  # op 11
    d = linear(act, w.w_down, exact=exact)  # op 12: [B, T, H]
    return x.add_(_norm_into(ws, "h_post2", d, w.post_ffn_norm, eps))  # op 13: [B, T, H]


def native_extras(cfg: ModelConfig, w: LayerWeights, layer: int) -> NativeExtras:
    """layer_forward as the native layer step computes it (ops 0-13 in one call, fp32 between the matmuls)."""
    return NativeExtras(w.q_norm, w.k_norm, w.post_attn_norm, w.post_ffn_norm, gelu=True,
                        window=cfg.local_window if cfg.is_local(layer) else 0,
                        scale=(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5)


def head(cfg: ModelConfig, norm: torch.Tensor, lm_head: Matrix, x: torch.Tensor, ws: Workspace,
         exact: bool = False) -> torch.Tensor:
    """x [B, T, H], norm [H], lm_head [V, H] -> logits [B, T, V] in fp32 (softcapped when the config says)."""
    h = _norm_into(ws, "h_attn", x, norm, cfg.rms_norm_eps)  # [B, T, H]
    logits = linear(h, lm_head, exact=exact)
    if (cap := cfg.final_logit_softcapping) is not None:
        logits = torch.tanh(logits / cap) * cap  # as HF, in the compute dtype
    return logits.float()


# --- around the layers -----------------------------------------------------------------------------------------
def rope_inv_freqs(cfg: ModelConfig, rope_freqs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(global [hd/2]: the file's base and scaling, local [hd/2]: local_rope_theta, unscaled)."""
    local = replace(cfg, rope_theta=cfg.local_rope_theta or LOCAL_ROPE_THETA, rope_scaling=RopeScaling())
    return rope_inv_freq(cfg, rope_freqs), rope_inv_freq(local)


def layer_rope(cfg: ModelConfig, layer: int) -> int:
    return 1 if cfg.is_local(layer) else 0


def embed_scale(cfg: ModelConfig) -> float:
    return cfg.hidden_size ** 0.5


def gguf_metadata(cfg: ModelConfig) -> dict[str, int | float]:
    """What llama.cpp's converter writes for Gemma 3 beyond the common keys (the pattern and local base are implied)."""
    return {"attention.sliding_window": int(cfg.local_window or 0), "attention.key_length": cfg.head_dim,
            "attention.value_length": cfg.head_dim}
