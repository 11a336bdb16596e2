"""Phi-3 (HF Phi3ForCausalLM, GGUF "phi3"): Llama's layer with q/k/v and gate/up fused in the files themselves
(HF qkv_proj / gate_up_proj, GGUF attn_qkv / ffn_up holding gate then up), no biases, one sliding window for
every layer when the config has one (Phi-3-mini-4k: 2047, the KV cache drops older blocks as for Mistral).

  (a) configuration  Llama's tables (model/llama.py); LongRoPE (rope type longrope/su, GGUF rope_factors_long/
                     short) and partial rotary embeddings are refused: HF switches LongRoPE's factors with the
                     sequence length and scales cos/sin, which this runner's fixed tables do not do
  (b) tensors        the fused ones, stored as LayerWeights holds them
  (c) forward        Llama's: the layer computes exactly llama.layer_forward (silu(gate) * up, rotate-half rope)

Shapes: B batch, T new tokens, H hidden, V vocab, nh query heads, nkv kv heads, hd head dim, I intermediate.
Weights are [out, in].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tierlm.config import ModelConfig
from tierlm.errors import UnsupportedModelError
from tierlm.model import llama
from tierlm.model.family import ConfigKey, ConfigSource, FieldDecl, Matrix, TensorDecl

# --- (a) configuration -----------------------------------------------------------------------------------------
GGUF_ARCHS = HF_MODEL_TYPES = {"phi3": "phi3"}
GGUF_WRITTEN_AS = {"phi3": "phi3"}
HF_CLASSES = {"phi3": "Phi3ForCausalLM"}
PERMUTED_QK_ARCHS: frozenset[str] = frozenset()  # llama.cpp ropes Phi-3 NeoX style: rows as in HF
NATIVE_LAYER_STEP = False  # (native/csrc/layer.cpp computes this layer too, but is not wired up for it)
native_extras = None  # not on the native step
_LONGROPE = "LongRoPE (rope scaling 'longrope'/'su', Phi-3 128k / Phi-3.5) is not supported"


def _gguf_rope_scaling(src: Any, fields: dict[str, Any]):
    if src.has_tensor("rope_factors_long") or src.has_tensor("rope_factors_short"):
        raise UnsupportedModelError(_LONGROPE)
    return llama._gguf_rope_scaling(src, fields)


def _hf_rope_scaling(src: ConfigSource, fields: dict[str, Any]):
    params = llama._hf_rope_params(src)
    if params.get("rope_type", params.get("type")) in ("longrope", "su", "yarn"):
        raise UnsupportedModelError(_LONGROPE)
    if float(params.get("partial_rotary_factor", src.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    return llama._hf_rope_scaling(src, fields)


GGUF_CONFIG = {**llama.GGUF_CONFIG, "attention_bias": lambda src, f: False, "rope_scaling": _gguf_rope_scaling}
HF_CONFIG = {
    **llama.HF_CONFIG,
    "rope_scaling": _hf_rope_scaling,
    "sliding_window": ConfigKey("sliding_window", None, None),  # every layer's, as HF Phi3 masks
    "attention_bias": lambda src, f: False,
    "rms_norm_eps": ConfigKey("rms_norm_eps", float, 1e-5),
}
HF_REFUSED = dict(llama.HF_REFUSED)

# --- (b) tensors -----------------------------------------------------------------------------------------------
GLOBAL_TENSORS = (
    *(t for t in llama.GLOBAL_TENSORS if t.name != "rope_freqs"),
    # LongRoPE's factors [hd/2]: declared so a file holding them is recognised (and refused, see above)
    TensorDecl("rope_factors_long", "rope_factors_long.weight", None, lambda c: (c.head_dim // 2,), optional=True,
               present=lambda c: False),
    TensorDecl("rope_factors_short", "rope_factors_short.weight", None, lambda c: (c.head_dim // 2,), optional=True,
               present=lambda c: False),
)
LAYER_TENSORS = (
    TensorDecl("attn_norm", "attn_norm.weight", "input_layernorm.weight", lambda c: (c.hidden_size,)),
    TensorDecl("wqkv", "attn_qkv.weight", "self_attn.qkv_proj.weight",
               lambda c: (c.q_size + 2 * c.kv_size, c.hidden_size), matrix=True),
    TensorDecl("wo", "attn_output.weight", "self_attn.o_proj.weight", lambda c: (c.hidden_size, c.q_size),
               matrix=True),
    TensorDecl("ffn_norm", "ffn_norm.weight", "post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
    TensorDecl("w_gateup", "ffn_up.weight", "mlp.gate_up_proj.weight",
               lambda c: (2 * c.intermediate_size, c.hidden_size), matrix=True),
    TensorDecl("w_down", "ffn_down.weight", "mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size),
               matrix=True),
)
LAYER_FIELDS = tuple(FieldDecl(t.name) for t in LAYER_TENSORS)  # stored as the files hold them


@dataclass
class LayerWeights:  # LAYER_FIELDS, by name
    attn_norm: torch.Tensor  # [H]
    wqkv: Matrix  # [(nh + 2*nkv)*hd, H]: q, k, v rows stacked
    wo: Matrix  # [H, nh*hd]
    ffn_norm: torch.Tensor  # [H]
    w_gateup: Matrix  # [2*I, H]: gate rows then up rows
    w_down: Matrix  # [H, I]

    # Phi-3 has no biases; llama.layer_forward reads these (not fields: nothing is stored for them)
    @property
    def bqkv(self) -> None:
        return None

    @property
    def bo(self) -> None:
        return None


# --- (c) forward: Llama's --------------------------------------------------------------------------------------
def workspace_buffers(cfg: ModelConfig, rows: int, act: torch.dtype, kv: torch.dtype, native_bytes: int = 0):
    return llama.workspace_buffers(cfg, rows, act, kv, 0)


layer_forward, head = llama.layer_forward, llama.head
rope_inv_freqs, layer_rope, embed_scale = llama.rope_inv_freqs, llama.layer_rope, llama.embed_scale


def gguf_metadata(cfg: ModelConfig) -> dict[str, int | float]:
    return {"attention.sliding_window": cfg.sliding_window} if cfg.sliding_window else {}
