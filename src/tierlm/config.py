"""Model and engine configuration: one `ModelConfig` whatever the file format it came from."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tierlm.errors import UnsupportedModelError, UsageError


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling`. kind: "none" | "linear" | "llama3"."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a name model/registry.py knows (the loaders refuse any other)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # every layer's window (Mistral, Phi-3): the paged KV cache drops older blocks
    # Models whose layers differ (Gemma 3; defaults: every layer alike, as Llama). Every `global_every`-th layer
    # (1-based) attends to every key with rope_theta; the others only to the last `local_window` keys, with rope
    # base `local_rope_theta` and no rope scaling. The KV cache keeps every token for the global layers.
    local_window: int | None = None
    global_every: int = 0  # 0: no local layers
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scores scaled by this ** -0.5 (None: head_dim)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2)
    name: str = ""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def is_local(self, layer: int) -> bool:
        """Whether `layer` attends within local_window only (Gemma 3's sliding-window layers)."""
        return self.global_every > 0 and (layer + 1) % self.global_every != 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V for one token across every layer."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Dtypes tensors may be stored in (synth output, offload store); compute uses DTYPES only.
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "int8": torch.int8, "uint8": torch.uint8}  # the last two: quantised parts (quant/)


def resolve_dtype(name: str | torch.dtype, quantized: bool = False) -> torch.dtype:
    """"auto" means fp32 on CPU (CPU bf16 matmul is not faster everywhere, and fp32 matches the oracle), and
    bf16 where `quantized` (QuantScheme.bf16_activations): torch's fused int8/int4 CPU kernels run 5-10x faster
    with bf16 activations."""
    if isinstance(name, torch.dtype):
        if name in (torch.float32, torch.bfloat16):
            return name
        raise UsageError(f"unsupported dtype {name} (use float32 or bfloat16)")
    if name == "auto":
        return torch.bfloat16 if quantized else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r} (use float32, bfloat16 or auto)")
    return DTYPES[name]


def attention_dtype(dtype: torch.dtype, cuda: bool) -> torch.dtype:
    """The KV cache's dtype and attention's compute dtype. On a CPU without native bf16 (no AVX512-BF16/AMX)
    bf16 attention is 4-7x slower than fp32 (measured on AVX2: SDPA over 1,000 cached tokens, 757 vs 110 us
    per layer), so a bf16 run keeps K/V in fp32 there: twice the KV bytes, bought for decode speed."""
    if dtype == torch.float32 or cuda or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return dtype
    return torch.float32


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """"1GiB" -> 1073741824. Plain integers are bytes. Only used at the edges (CLI, API)."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"size must be non-negative, got {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"cannot parse size {text!r} (examples: 512MiB, 4GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def format_size(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cache_dir() -> Path:
    """tierlm's per-user cache ($XDG_CACHE_HOME/tierlm, ~/.cache/tierlm): the calibrated profile, saved
    sessions, model fingerprints."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tierlm"
