"""The integer-dot kernels of the native library as quant/kernels.py's dispatch sees them: which matrices they take
and the call. A matrix goes to them in its loaded form (QuantTensor: int4 g=32 scales/mins fp16 in GGUF nibble
order; int8 g=32 with fp16 scales, or one fp32 scale per row) when they are enabled (TIERLM_NATIVE=1; Q8_0 blocks
whenever the library is built, see scheme.uses_native). `exact` multiplies with fp32 activations instead of int8
ones (W4A32): slower, and the reference the int-dot numerics are measured against.
"""
from __future__ import annotations

import torch

from tierlm import native
from tierlm.quant import ggml
from tierlm.quant.scheme import uses_native
from tierlm.quant.tensor import QuantTensor

NUMERICS = 4  # bumped when the native kernels change what they compute (goes into the KV salt via numerics_tag);
# 4: Qwen3's layer on the layer step (it ran in Python before)


def runs(w: object) -> bool:
    return isinstance(w, QuantTensor) and w.kind != "ggml" and w.kernel_scales is None and uses_native(w.kind, w.group_size, w.shape[1])


TORCH_INT4, TORCH_INT8 = 104, 108  # layer.cpp: torch's fused form, multiplied by torch's kernels
GGML = 200  # layer.cpp: GGUF's own blocks (quant/ggml.py), multiplied by ggml_dot.cpp


def layer_mat(w: object) -> tuple | None:
    """A layer matrix as layer_step takes it: the integer-dot form, or torch's fused form; None: neither."""
    if runs(w):
        return mat(w)
    if isinstance(w, QuantTensor) and w.kind == "ggml":
        return GGML, w.qweight, ggml.runs_tensor(w.runs, w.shape[1]), None, None
    if isinstance(w, QuantTensor) and w.kernel_scales is not None:
        return (TORCH_INT4 if w.kind == "int4" else TORCH_INT8), w.qweight, w.kernel_scales, None, None
    return None


def mat(w: QuantTensor) -> tuple:
    """(kind, q, d, m, dch) as the library takes a matrix."""
    if w.kind == "int4":
        return 4, w.qweight, w.scales, w.mins, None
    if w.group_size == w.shape[1]:  # per channel: fp32 [N, 1]
        return 8, w.qweight, None, None, w.scales.reshape(-1)
    return 8, w.qweight, w.scales, None, None


def linear(x: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None, exact: bool) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype."""
    return native.lib().linear(x, mat(w), bias, exact)


def numerics_tag(exact: bool) -> str:
    """What the bits of a forward pass depend on beyond the weights (the KV salt has it)."""
    if not native.layer_step_available():
        return "torch"
    if not native.available():
        return f"layer{NUMERICS}-torchmm-{native.lib().isa()}"  # Q8_0 matrices take the int-dot kernels here too
    return f"native{NUMERICS}-{native.status()}-{'a32' if exact else 'a8'}"
