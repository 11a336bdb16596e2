"""A contiguous KV cache: one preallocated buffer for a batch of sequences that grow together.

Lifetime: created by the engine for one generation (capacity = prompt + max new tokens), released after.
The paged cache (a later issue) replaces it behind the same `layer(i).update(start_pos, k, v)` interface.
"""
from __future__ import annotations

import torch

from tierlm.config import ModelConfig
from tierlm.errors import ContextLengthError


class LayerKV:
    """View of one layer's slice of the cache."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k  # [B, nkv, capacity, hd]
        self.v = v  # [B, nkv, capacity, hd]

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, nkv, T, hd] at start_pos; return views [B, nkv, start_pos+T, hd]."""
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ContextLengthError(f"KV cache full: {end} tokens > capacity {self.k.shape[2]}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.capacity = capacity
        # [layers, 2 (k, v), B, nkv, capacity, hd]; empty(), not zeros(): slots are written before read.
        self.buffer: torch.Tensor | None = torch.empty(
            (cfg.num_layers, 2, batch, cfg.num_kv_heads, capacity, cfg.head_dim), dtype=dtype, device=device)
        self._layers = [LayerKV(self.buffer[i, 0], self.buffer[i, 1]) for i in range(cfg.num_layers)]
        self.length = 0  # tokens whose K/V are stored (same for every sequence in the batch)

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def layer(self, i: int) -> LayerKV:
        return self._layers[i]

    def release(self) -> None:
        self.buffer, self._layers = None, []
