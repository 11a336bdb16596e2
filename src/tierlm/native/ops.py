"""Python side of the native library: which matrices and steps it takes, and the calls.

A matrix goes to the integer-dot kernels in its loaded form (QuantTensor: int4 g=32 scales/mins fp16 in GGUF
nibble order; int8 g=32 with fp16 scales, or one fp32 scale per row) when they are enabled (TIERLM_NATIVE=1).
A layer goes to `layer_step` (one call: norm, QKV, rope, K/V write, paged attention, output projection, MLP)
when all its matrices are in that form or in torch's fused form (multiplied there by torch's own kernels), its
KV pool holds bf16 or fp32 (int8 KV and sliding windows take the Python layer), and the step is a paged one.
`exact` multiplies with fp32 activations instead of int8 ones (W4A32): slower, and the reference the int-dot
numerics are measured against.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tierlm import native
from tierlm.quant.tensor import QuantTensor

if TYPE_CHECKING:
    from tierlm.config import ModelConfig
    from tierlm.kvcache.step import PagedStep
    from tierlm.model.llama import LayerWeights

KV_DTYPES = (torch.bfloat16, torch.float32)
NUMERICS = 3  # bumped when the native kernels change what they compute (goes into the KV salt via numerics_tag)


def uses_native(kind: str, group_size: int, k: int) -> bool:
    """Whether a matrix of this kind and K runs on the integer-dot kernels (stored in its loaded form): int8 g=32
    (GGUF Q8_0 blocks, for which torch has no fused kernel) whenever the library is in use; int4 g=32 and int8
    per channel with TIERLM_NATIVE=1."""
    if k % 32 or not native.layer_step_available():
        return False
    return (kind == "int8" and group_size == 32) or native.available() and (group_size == 32 or group_size == k)


def runs(w: object) -> bool:
    return isinstance(w, QuantTensor) and w.kernel_scales is None and uses_native(w.kind, w.group_size, w.shape[1])


TORCH_INT4, TORCH_INT8 = 104, 108  # layer.cpp: torch's fused form, multiplied by torch's kernels


def layer_mat(w: object) -> tuple | None:
    """A layer matrix as layer_step takes it: the integer-dot form, or torch's fused form; None: neither."""
    if runs(w):
        return _mat(w)
    if isinstance(w, QuantTensor) and w.kernel_scales is not None:
        return (TORCH_INT4 if w.kind == "int4" else TORCH_INT8), w.qweight, w.kernel_scales, None, None
    return None


def _mat(w: QuantTensor) -> tuple:
    """(kind, q, d, m, dch) as the library takes a matrix."""
    if w.kind == "int4":
        return 4, w.qweight, w.scales, w.mins, None
    if w.group_size == w.shape[1]:  # per channel: fp32 [N, 1]
        return 8, w.qweight, None, None, w.scales.reshape(-1)
    return 8, w.qweight, w.scales, None, None


def linear(x: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None, exact: bool) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype."""
    return native.lib().linear(x, _mat(w), bias, exact)


def layer_mats(w: LayerWeights) -> tuple | None:
    """The layer's four matrices (wqkv, wo, w_gateup, w_down) as layer_step takes them, packed once per layer
    and step; None when one of them is in neither form (the layer takes the Python path)."""
    mats = tuple(layer_mat(m) for m in (w.wqkv, w.wo, w.w_gateup, w.w_down))
    return None if None in mats else mats


def layer_supported(w: LayerWeights) -> bool:
    return layer_mats(w) is not None


def step_supported(step: object) -> bool:
    """A paged step whose pool the native attention reads (bf16/fp32 K/V, no sliding window)."""
    from tierlm.kvcache.step import PagedStep  # not at import: kvcache -> model -> kernels -> here
    return isinstance(step, PagedStep) and step.kv.pool.store in KV_DTYPES and step.kv.config.sliding_window is None


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
    pool = step.kv.pool
    wqkv, wo, w_gateup, w_down = mats
    native.lib().layer_step(x, w.attn_norm, w.ffn_norm, wqkv, w.bqkv, wo, w.bo, w_gateup, w_down, rope32[0],
                            rope32[1], step.positions, step.tables, pool.k[layer], pool.v[layer], cfg.num_heads,
                            cfg.num_kv_heads, cfg.rms_norm_eps, exact, scratch)


def numerics_tag(exact: bool) -> str:
    """What the bits of a forward pass depend on beyond the weights (the KV salt has it)."""
    if not native.layer_step_available():
        return "torch"
    if not native.available():
        return f"layer{NUMERICS}-torchmm-{native.lib().isa()}"  # Q8_0 matrices take the int-dot kernels here too
    return f"native{NUMERICS}-{native.status()}-{'a32' if exact else 'a8'}"
