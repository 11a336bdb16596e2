"""The native layer step (tierlm/native/csrc/layer.cpp) for a Llama-family layer: one call does norm, QKV, rope,
K/V write, paged attention, output projection and MLP; a model whose NATIVE_LAYER_STEP is set says through its
native_extras what its layer adds (Qwen3's q/k norms; Gemma 3's too, its post norms, GeGLU, local windows). A
layer goes to it when all its matrices are in the integer-dot form, GGUF blocks or torch's fused form
(quant/intdot.py: multiplied there by torch's own kernels), and its KV pool holds bf16 or fp32 (int8 KV and a
sliding-window cache take the Python layer, the model's layer_forward).
"""
from __future__ import annotations

from typing import Any

import torch

from tierlm import native
from tierlm.config import ModelConfig
from tierlm.kvcache.step import PagedStep
from tierlm.model import llama, registry
from tierlm.model.family import field_is_matrix
from tierlm.quant.intdot import layer_mat

KV_DTYPES = (torch.bfloat16, torch.float32)
# The layer's matrices as the model declares them, in storage order: (wqkv, wo, w_gateup, w_down), layer_step's
# (every model on the native step names its matrices so: asserted below).
MATRICES = tuple(f.name for f in llama.LAYER_FIELDS if field_is_matrix(llama, f))
assert all(tuple(f.name for f in m.LAYER_FIELDS if field_is_matrix(m, f)) == MATRICES
           for m in registry.MODELS if m.native_extras is not None), "a native-step model's matrices are not layer_step's"
Layer = Any  # the model's LayerWeights (registry.for_config(cfg).LayerWeights)


def layer_mats(w: Layer) -> tuple | None:
    """The layer's matrices (MATRICES) as layer_step takes them, packed once per layer and step; None when one
    of them is in neither form (the layer takes the Python path)."""
    mats = tuple(layer_mat(getattr(w, name)) for name in MATRICES)
    return None if None in mats else mats


def layer_supported(w: Layer) -> bool:
    return layer_mats(w) is not None


def step_supported(step: PagedStep) -> bool:
    """A paged step whose pool the native attention reads (bf16/fp32 K/V, no sliding window)."""
    return step.pool.storage in KV_DTYPES and step.window is None


def scratch_bytes(cfg: ModelConfig, rows: int, quantised: bool = True) -> int:
    """The scratch one layer_step over `rows` token rows needs (its activations, fp32, and their int8 form);
    0 when no layer step will run (no library, or dense weights)."""
    if not (native.layer_step_available() and quantised):
        return 0
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return native.lib().scratch_bytes(rows, cfg.hidden_size, qkv, cfg.q_size, cfg.intermediate_size)


def layer_step(cfg: ModelConfig, w: Layer, mats: tuple, x: torch.Tensor,
               rope32: tuple[torch.Tensor, torch.Tensor], step: PagedStep, layer: int, scratch: torch.Tensor,
               exact: bool) -> None:
    """One decoder layer over the step's rows, x [B, T, H] updated in place (the model's layer_forward's contract);
    mats: layer_mats(w); rope32: the fp32 (cos, sin) [max_context, hd] of this layer's rope."""
    pool = step.pool
    m = dict(zip(MATRICES, mats))
    e = registry.for_config(cfg).native_extras(cfg, w, layer)
    native.lib().layer_step(x, w.attn_norm, w.ffn_norm, m["wqkv"], e.bqkv, m["wo"], e.bo, m["w_gateup"],
                            m["w_down"], rope32[0], rope32[1], step.positions, step.tables, pool.k[layer],
                            pool.v[layer], cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, exact, scratch,
                            e.q_norm, e.k_norm, e.post_attn_norm, e.post_ffn_norm, e.gelu, e.window, e.scale)
