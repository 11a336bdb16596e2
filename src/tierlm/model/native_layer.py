"""The native layer step (tierlm/native/csrc/layer.cpp) for a Llama-family layer: one call does norm, QKV, rope,
K/V write, paged attention, output projection and MLP. A layer goes to it when all its matrices are in the
integer-dot form or in torch's fused form (quant/intdot.py: multiplied there by torch's own kernels), its KV
pool holds bf16 or fp32 (int8 KV and sliding windows take the Python layer, llama.layer_forward).
"""
from __future__ import annotations

import torch

from tierlm import native
from tierlm.config import ModelConfig
from tierlm.kvcache.step import PagedStep
from tierlm.model import llama
from tierlm.model.family import field_is_matrix
from tierlm.model.llama import LayerWeights
from tierlm.quant.intdot import layer_mat

KV_DTYPES = (torch.bfloat16, torch.float32)
# The layer's matrices as the model declares them, in storage order: (wqkv, wo, w_gateup, w_down), layer_step's.
MATRICES = tuple(f.name for f in llama.LAYER_FIELDS if field_is_matrix(llama, f))


def layer_mats(w: LayerWeights) -> tuple | None:
    """The layer's matrices (MATRICES) as layer_step takes them, packed once per layer and step; None when one
    of them is in neither form (the layer takes the Python path)."""
    mats = tuple(layer_mat(getattr(w, name)) for name in MATRICES)
    return None if None in mats else mats


def layer_supported(w: LayerWeights) -> bool:
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


def layer_step(cfg: ModelConfig, w: LayerWeights, mats: tuple, x: torch.Tensor,
               rope32: tuple[torch.Tensor, torch.Tensor], step: PagedStep, layer: int, scratch: torch.Tensor,
               exact: bool) -> None:
    """One decoder layer over the step's rows, x [B, T, H] updated in place (llama.layer_forward's contract);
    mats: layer_mats(w)."""
    pool = step.pool
    m = dict(zip(MATRICES, mats))
    native.lib().layer_step(x, w.attn_norm, w.ffn_norm, m["wqkv"], w.bqkv, m["wo"], w.bo, m["w_gateup"],
                            m["w_down"], rope32[0], rope32[1], step.positions, step.tables, pool.k[layer],
                            pool.v[layer], cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, exact, scratch)
