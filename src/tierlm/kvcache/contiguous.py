"""A contiguous KV cache: one preallocated buffer for a batch of sequences that grow together.

Lifetime: created for one generation (capacity = prompt + max new tokens), released after. The paged cache
(paged.py) is what the engine uses; this one is the simple reference it is tested against, and serves
calibration. Both hand the runner a step object: `positions` [B, T], `layer(i).update(k, v)` ->
(k_all, v_all, mask), `finish()`.
"""
from __future__ import annotations

import torch

from tierlm.config import ModelConfig
from tierlm.errors import ContextLengthError
from tierlm.kvcache.step import attention_mask


class LayerKV:
    """View of one layer's slice of the cache for one step."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, step: "ContiguousStep"):
        self.k, self.v, self.step = k, v, step  # k, v [B, nkv, capacity, hd]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, nkv, T, hd] at the step's start; return views [B, nkv, start+T, hd] and the mask."""
        start, end = self.step.start, self.step.end
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end], self.step.mask


class ContiguousStep:
    def __init__(self, cache: "KVCache", b: int, t: int):
        self.cache, self.start, self.end = cache, cache.length, cache.length + t
        dev = cache.buffer.device
        self.positions = torch.arange(self.start, self.end, device=dev).expand(b, t)  # [B, T]
        self.mask = attention_mask(self.positions, self.end, cache.sliding_window)  # [B, 1, T, S] | None

    def layer(self, i: int) -> LayerKV:
        buf = self.cache.buffer
        return LayerKV(buf[i, 0], buf[i, 1], self)

    def finish(self) -> None:
        self.cache.length = self.end


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.capacity, self.sliding_window = capacity, cfg.sliding_window
        # [layers, 2 (k, v), B, nkv, capacity, hd]; empty(), not zeros(): slots are written before read.
        self.buffer: torch.Tensor | None = torch.empty(
            (cfg.num_layers, 2, batch, cfg.num_kv_heads, capacity, cfg.head_dim), dtype=dtype, device=device)
        self.length = 0  # tokens whose K/V are stored (same for every sequence in the batch)

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def step(self, tokens: torch.Tensor) -> ContiguousStep:
        """A forward step appending tokens [B, T]."""
        end = self.length + tokens.shape[1]
        if end > self.capacity:
            raise ContextLengthError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        return ContiguousStep(self, tokens.shape[0], tokens.shape[1])

    def release(self) -> None:
        self.buffer = None
