"""Memory needed to run a model: weights by storage scheme, KV cache, activation buffers. Pure functions.

Schemes (what a weight matrix costs per parameter; 1-D norms/biases stay in 16-bit except under fp32):
  fp32 4 B · bf16 2 B · int8 W8A16, g=128: 1 B + one bf16 scale per 128 · int4 W4A16, g=32: 0.5 B + bf16
  scale and zero per 32 (the layout GGUF Q4_1 maps onto exactly).
"""
from __future__ import annotations

from dataclasses import dataclass

from tierlm.config import ModelConfig
from tierlm.model import registry

SCHEMES: dict[str, tuple[float, int]] = {  # name -> (bytes per matrix parameter, bytes per vector parameter)
    "fp32": (4.0, 4),
    "bf16": (2.0, 2),
    "int8": (1.0 + 2 / 128, 2),
    "int4": (0.5 + 4 / 32, 2),
}


@dataclass(frozen=True)
class WeightBytes:
    per_layer: int
    layers: int  # all decoder layers
    embed: int
    lm_head: int  # 0 when tied to the embedding
    norm: int

    @property
    def total(self) -> int:
        return self.layers + self.embed + self.lm_head + self.norm


def weight_bytes(cfg: ModelConfig, scheme: str) -> WeightBytes:
    mat, vec = SCHEMES[scheme]
    h = cfg.hidden_size
    vectors = 2 * h + ((cfg.q_size + 2 * cfg.kv_size) if cfg.attention_bias else 0)  # norms + qkv biases
    per_layer = int((registry.layer_param_count(cfg) - vectors) * mat) + vectors * vec
    embed = int(cfg.vocab_size * h * mat)
    return WeightBytes(per_layer=per_layer, layers=per_layer * cfg.num_layers, embed=embed,
                       lm_head=0 if cfg.tie_word_embeddings else embed, norm=h * vec)


def kv_bytes(cfg: ModelConfig, context: int, batch: int, dtype_bytes: int) -> int:
    """K and V for `batch` sequences of `context` tokens, every layer."""
    return cfg.kv_bytes_per_token(dtype_bytes) * context * batch


@dataclass(frozen=True)
class ActivationBytes:
    hidden: int  # residual stream [B, S, H] (normed copies live in the workspace, planned separately)
    qkv: int  # [B, S, (nh + 2·nkv)·hd]
    attn_out: int  # [B, S, nh·hd]
    ffn: int  # gate and up [B, S, I] ×2
    logits: int  # [B, V] fp32: only the last position is projected

    @property
    def total(self) -> int:
        return self.hidden + self.qkv + self.attn_out + self.ffn + self.logits


def activation_bytes(cfg: ModelConfig, seq: int, batch: int, dtype_bytes: int) -> ActivationBytes:
    """Tensors that torch's kernels allocate in one layer during a prefill of `seq` tokens (layers run one at
    a time): the residual stream and the matmul/attention outputs. Every other intermediate lives in the
    workspace arena (memory/workspace.py), whose size is planned exactly."""
    bs = batch * seq * dtype_bytes
    return ActivationBytes(
        hidden=bs * cfg.hidden_size,
        qkv=bs * (cfg.q_size + 2 * cfg.kv_size),
        attn_out=bs * cfg.q_size,
        ffn=2 * bs * cfg.intermediate_size,
        logits=batch * cfg.vocab_size * 4,
    )
