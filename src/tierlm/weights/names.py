"""One internal tensor naming, and explicit maps from each file format to it.

Internal names (shapes are [out, in] like torch.nn.Linear):
  embed [V, H]   norm [H]   lm_head [V, H] (absent when tied)   rope_freqs [head_dim/2] (llama3 GGUF only)
  layers.{i}.{attn_norm, wq, wk, wv, bq, bk, bv, wo, bo, ffn_norm, w_gate, w_up, w_down}
"""
from __future__ import annotations

import re

LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo",
                 "ffn_norm", "w_gate", "w_up", "w_down")
REQUIRED_LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")

_HF_GLOBAL = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
}
_HF_LAYER = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq", "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.weight": "wk", "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.weight": "wv", "self_attn.v_proj.bias": "bv",
    "self_attn.o_proj.weight": "wo", "self_attn.o_proj.bias": "bo",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down",
}
_GGUF_GLOBAL = {
    "token_embd.weight": "embed",
    "output_norm.weight": "norm",
    "output.weight": "lm_head",
    "rope_freqs.weight": "rope_freqs",
}
_GGUF_LAYER = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq", "attn_q.bias": "bq",
    "attn_k.weight": "wk", "attn_k.bias": "bk",
    "attn_v.weight": "wv", "attn_v.bias": "bv",
    "attn_output.weight": "wo", "attn_output.bias": "bo",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _map(name: str, globals_: dict[str, str], layer_re: re.Pattern, layer_map: dict[str, str]) -> str | None:
    if name in globals_:
        return globals_[name]
    m = layer_re.match(name)
    if m and m.group(2) in layer_map:
        return f"layers.{m.group(1)}.{layer_map[m.group(2)]}"
    return None


def hf_to_internal(name: str) -> str | None:
    """None for tensors tierlm does not use (e.g. rotary inv_freq buffers)."""
    return _map(name, _HF_GLOBAL, _HF_LAYER_RE, _HF_LAYER)


def gguf_to_internal(name: str) -> str | None:
    return _map(name, _GGUF_GLOBAL, _GGUF_LAYER_RE, _GGUF_LAYER)


def layer_name(layer: int, tensor: str) -> str:
    return f"layers.{layer}.{tensor}"


def check_complete(names: set[str], num_layers: int, tied: bool) -> list[str]:
    """Internal names a runnable model needs but the file lacks (empty when complete)."""
    need = ["embed", "norm"] + ([] if tied else ["lm_head"])
    need += [layer_name(i, t) for i in range(num_layers) for t in REQUIRED_LAYER_TENSORS]
    return [n for n in need if n not in names]
