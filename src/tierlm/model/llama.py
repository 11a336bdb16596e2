"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2): what it is, declared as data, and its forward pass.

  (a) configuration  GGUF metadata / HF config.json -> ModelConfig (GGUF_CONFIG, HF_CONFIG)
  (b) tensors        every tensor a layer and the model have, with their file names and shapes (LAYER_TENSORS,
                     GLOBAL_TENSORS), and how a layer stores them (LAYER_FIELDS: q/k/v and gate/up fused)
  (c) forward        layer_forward and head, one decoder layer at a time
The types of the declaration are in model/family.py; model/registry.py finds this file by architecture name.

Shapes: B batch, T new tokens, S tokens in the KV cache after this step, H hidden, V vocab,
nh query heads, nkv kv heads, hd head dim, I intermediate. Weights are [out, in] (torch Linear layout).
The runner owns the layer loop and weight residency; this file owns only arithmetic, and matches HF
transformers op for op (RMSNorm in fp32, rotate-half rope; attention: the KV cache's blocked attention, SDPA
under a sliding window) so fp32 logits agree with HF's to test tolerances (tests/test_parity.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tierlm.config import ModelConfig, RopeScaling
from tierlm.errors import UnsupportedModelError
from tierlm.memory.workspace import BufferSpec, Workspace
from tierlm.model.family import ConfigKey, ConfigSource, FieldDecl, Matrix, NativeExtras, TensorDecl
from tierlm.model.ops import apply_rope, attend, norm_in_workspace, rope_inv_freq
from tierlm.quant.kernels import linear

# --- (a) configuration -----------------------------------------------------------------------------------------
# Every name is at once an HF model_type, a GGUF general.architecture and a ModelConfig.arch.
GGUF_ARCHS = HF_MODEL_TYPES = {a: a for a in ("llama", "mistral", "qwen2")}
GGUF_WRITTEN_AS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # llama.cpp converts Mistral as "llama"
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # tierlm synth
# GGUF architectures whose converter permuted q/k rows for llama.cpp's interleaved (GPT-J style) rope;
# this forward (like HF) rotates halves (NeoX style), so the loader permutes those rows back.
PERMUTED_QK_ARCHS = frozenset({"llama", "mistral"})
NATIVE_LAYER_STEP = True  # native/csrc/layer.cpp is this file's layer_forward in one call (quantised layers, CPU)


def native_extras(cfg: ModelConfig, w: "LayerWeights", layer: int) -> NativeExtras:
    return NativeExtras(bqkv=w.bqkv, bo=w.bo)  # the native step's own layer


def _gguf_rope_scaling(src: ConfigSource, fields: dict[str, Any]) -> RopeScaling:
    kind = src.get("rope.scaling.type", "none")  # llama3 scaling comes as the rope_freqs tensor instead
    if kind not in ("none", "linear"):
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported")
    return RopeScaling(kind="linear", factor=ConfigKey("rope.scaling.factor", float)(src, fields)) \
        if kind == "linear" else RopeScaling()


# GGUF keys are under "{arch}."; vocabulary, tied head and biases are read off the tensors (GGUFConfig).
GGUF_CONFIG = {
    "vocab_size": lambda src, f: int(src.tensor_shape("embed")[0]),
    "tie_word_embeddings": lambda src, f: not src.has_tensor("lm_head"),
    "attention_bias": lambda src, f: src.has_tensor("layers.0.bq"),
    "hidden_size": ConfigKey("embedding_length"),
    "num_heads": ConfigKey("attention.head_count"),
    "rope_scaling": _gguf_rope_scaling,
    "intermediate_size": ConfigKey("feed_forward_length"),
    "num_layers": ConfigKey("block_count"),
    "num_kv_heads": ConfigKey("attention.head_count_kv", default=lambda f: f["num_heads"]),
    "head_dim": ConfigKey("attention.key_length", default=lambda f: f["hidden_size"] // f["num_heads"]),
    "max_position_embeddings": ConfigKey("context_length"),
    "rms_norm_eps": ConfigKey("attention.layer_norm_rms_epsilon", float),
    "rope_theta": ConfigKey("rope.freq_base", float, 10000.0),
    "sliding_window": ConfigKey("attention.sliding_window", None, None),
}


def _hf_rope_params(src: ConfigSource) -> dict[str, Any]:
    # transformers >=5 writes `rope_parameters`; older files write `rope_theta` + `rope_scaling`.
    return src.get("rope_parameters") or src.get("rope_scaling") or {}


def _hf_rope_scaling(src: ConfigSource, fields: dict[str, Any]) -> RopeScaling:
    return rope_scaling_of(_hf_rope_params(src))


def rope_scaling_of(params: dict[str, Any]) -> RopeScaling:
    """HF rope parameters (rope_parameters or rope_scaling) -> RopeScaling (Gemma 3 has one dict per layer type)."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")


HF_CONFIG = {
    "hidden_size": ConfigKey("hidden_size"),
    "num_heads": ConfigKey("num_attention_heads"),
    "rope_theta": lambda src, f: float(src.get("rope_theta") or _hf_rope_params(src).get("rope_theta") or 10000.0),
    "rope_scaling": _hf_rope_scaling,
    # Mistral windows unless told not to; Qwen2 only with use_sliding_window
    "sliding_window": lambda src, f: src.get("sliding_window")
    if src.get("use_sliding_window", src.get("model_type") == "mistral") else None,
    "vocab_size": ConfigKey("vocab_size"),
    "intermediate_size": ConfigKey("intermediate_size"),
    "num_layers": ConfigKey("num_hidden_layers"),
    "num_kv_heads": ConfigKey("num_key_value_heads", default=lambda f: f["num_heads"]),
    "head_dim": ConfigKey("head_dim", default=lambda f: f["hidden_size"] // f["num_heads"]),
    "max_position_embeddings": ConfigKey("max_position_embeddings", default=2048),
    "rms_norm_eps": ConfigKey("rms_norm_eps", float, 1e-6),
    "attention_bias": lambda src, f: src.get("model_type") == "qwen2" or bool(src.get("attention_bias", False)),
    "tie_word_embeddings": ConfigKey("tie_word_embeddings", bool, False),
}
HF_REFUSED = {"mlp_bias": "MLP biases (mlp_bias=true) are not supported"}


# --- (b) tensors -----------------------------------------------------------------------------------------------
def _qkv_bias(c: ModelConfig) -> bool:
    return c.attention_bias


def _o_bias(c: ModelConfig) -> bool:  # Qwen2 has q/k/v biases only; Llama with attention_bias all four
    return c.attention_bias and c.arch != "qwen2"


GLOBAL_TENSORS = (
    TensorDecl("rope_freqs", "rope_freqs.weight", None, lambda c: (c.head_dim // 2,), optional=True,
               present=lambda c: c.rope_scaling.kind == "llama3"),  # llama3 GGUF: the converter's factors
    TensorDecl("embed", "token_embd.weight", "model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size),
               matrix=True),
    TensorDecl("norm", "output_norm.weight", "model.norm.weight", lambda c: (c.hidden_size,), after_layers=True),
    TensorDecl("lm_head", "output.weight", "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), matrix=True,
               present=lambda c: not c.tie_word_embeddings, after_layers=True),  # absent when tied
)
LAYER_TENSORS = (
    TensorDecl("attn_norm", "attn_norm.weight", "input_layernorm.weight", lambda c: (c.hidden_size,)),
    TensorDecl("wq", "attn_q.weight", "self_attn.q_proj.weight", lambda c: (c.q_size, c.hidden_size), matrix=True,
               gguf_permuted=True),
    TensorDecl("wk", "attn_k.weight", "self_attn.k_proj.weight", lambda c: (c.kv_size, c.hidden_size), matrix=True,
               gguf_permuted=True),
    TensorDecl("wv", "attn_v.weight", "self_attn.v_proj.weight", lambda c: (c.kv_size, c.hidden_size), matrix=True),
    TensorDecl("wo", "attn_output.weight", "self_attn.o_proj.weight", lambda c: (c.hidden_size, c.q_size),
               matrix=True),
    TensorDecl("bq", "attn_q.bias", "self_attn.q_proj.bias", lambda c: (c.q_size,), optional=True, present=_qkv_bias,
               gguf_permuted=True),
    TensorDecl("bk", "attn_k.bias", "self_attn.k_proj.bias", lambda c: (c.kv_size,), optional=True,
               present=_qkv_bias, gguf_permuted=True),
    TensorDecl("bv", "attn_v.bias", "self_attn.v_proj.bias", lambda c: (c.kv_size,), optional=True, present=_qkv_bias),
    TensorDecl("bo", "attn_output.bias", "self_attn.o_proj.bias", lambda c: (c.hidden_size,), optional=True,
               present=_o_bias),
    TensorDecl("ffn_norm", "ffn_norm.weight", "post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
    TensorDecl("w_gate", "ffn_gate.weight", "mlp.gate_proj.weight", lambda c: (c.intermediate_size, c.hidden_size),
               matrix=True),
    TensorDecl("w_up", "ffn_up.weight", "mlp.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size),
               matrix=True),
    TensorDecl("w_down", "ffn_down.weight", "mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size),
               matrix=True),
)
# A layer as stored (this order is the offload store's layout) and computed with: one matmul for q, k, v and
# one for gate, up. The bias fields are there whenever attention_bias is (a Qwen2 unit keeps room for bo).
LAYER_FIELDS = (
    FieldDecl("attn_norm"), FieldDecl("wqkv", ("wq", "wk", "wv")),
    FieldDecl("bqkv", ("bq", "bk", "bv"), when=_qkv_bias), FieldDecl("bo", when=_qkv_bias),
    FieldDecl("wo"), FieldDecl("ffn_norm"), FieldDecl("w_gateup", ("w_gate", "w_up")), FieldDecl("w_down"),
)


@dataclass
class LayerWeights:  # LAYER_FIELDS, by name
    attn_norm: torch.Tensor  # [H]
    wqkv: Matrix  # [(nh + 2*nkv)*hd, H]: q, k, v rows stacked (one matmul)
    wo: Matrix  # [H, nh*hd]
    ffn_norm: torch.Tensor  # [H]
    w_gateup: Matrix  # [2*I, H]: gate rows then up rows (one matmul)
    w_down: Matrix  # [H, I]
    bqkv: torch.Tensor | None = None  # [(nh + 2*nkv)*hd]   (Qwen2)
    bo: torch.Tensor | None = None  # [H]       (Llama with attention_bias)


# --- (c) forward -----------------------------------------------------------------------------------------------
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
    attn = attend(ws, q, k, v, kv)  # op 3: store k, v; op 4: attend to every stored key: [B, nh, T, hd]
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


# --- around the layers (the runner calls these) ----------------------------------------------------------------
def rope_inv_freqs(cfg: ModelConfig, rope_freqs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return (rope_inv_freq(cfg, rope_freqs),)  # [hd/2]: one rope for every layer


def layer_rope(cfg: ModelConfig, layer: int) -> int:
    return 0


def embed_scale(cfg: ModelConfig) -> float | None:
    return None


def gguf_metadata(cfg: ModelConfig) -> dict[str, int | float]:
    return {}
