"""The layer runner: walks layers explicitly, taking each layer's weights from the WeightStore.

    for layer i: w = store.acquire(i) -> compute(i) -> store.release(i)

Prefetch of layer i+k (host/disk tiers) slots into this loop; no module fetches weights by itself.
"""
from __future__ import annotations

import torch

from tierlm.config import ModelConfig
from tierlm.kvcache.contiguous import KVCache
from tierlm.memory.store import WeightStore
from tierlm.model import llama


class Runner:
    def __init__(self, store: WeightStore, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.store = store
        self.config: ModelConfig = store.config
        self.dtype = dtype
        self.device = torch.device(device)
        inv_freq = llama.rope_inv_freq(self.config, store.globals.rope_freqs)  # [hd/2]
        # cos/sin for every position the model supports: [max_pos, hd] each (small: 8192×64×4 B = 2 MiB).
        cos, sin = llama.rope_tables(inv_freq, self.config.max_position_embeddings, dtype)
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] appended after kv.length cached tokens -> logits [B, V] (last position) or
        [B, T, V] with all_logits. Advances kv.length by T."""
        start = kv.length
        t = tokens.shape[1]
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]  # [T, hd]
        x = llama.embed(self.store.globals, tokens.to(self.device))  # [B, T, H]
        for i in range(self.config.num_layers):
            w = self.store.acquire(i)
            x = llama.layer_forward(self.config, w, x, cos, sin, kv.layer(i), start)
            self.store.release(i)
        kv.length = start + t
        if not all_logits:
            x = x[:, -1:]  # only the last position feeds sampling: skip the [T, V] head matmul
        logits = llama.head(self.config, self.store.globals, x)  # [B, T|1, V]
        return logits if all_logits else logits[:, -1]
