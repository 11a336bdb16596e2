"""The KV pool: one preallocated tensor pair holding every block, every layer.

    k, v: [layers, nkv, num_blocks, block_size, hd]   (int8 KV: int8 values + fp16 scales
                                                      [layers, nkv, num_blocks, block_size], per token & head)

The pool is reserved with empty() (pages are committed as blocks are first used) and a block is zeroed
when it is allocated: a masked read of a never-written slot must be finite, because a masked score times a
NaN value is still NaN. A block's bytes can be read out and written back whole (read_block/write_block):
that is how blocks move to and from the host and disk tiers.
"""
from __future__ import annotations

import torch

from tierlm.config import ModelConfig
from tierlm.memory import allocator


def block_nbytes(cfg: ModelConfig, block_size: int, storage: torch.dtype) -> int:
    """Bytes of one block across every layer, K and V, stored as `storage` (int8: 1 B per value + a 2 B scale
    per token & head)."""
    per_token_head = cfg.head_dim * storage.itemsize + (2 if storage == torch.int8 else 0)
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * per_token_head


class KVPool:
    """K/V storage. `dtype` is what attention reads (gather returns it); `storage` what the pool holds: the
    same, a narrower float (bf16 KV for fp32 attention), or int8 with scales."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", storage: torch.dtype | None = None, capacity: int | None = None):
        storage = storage or dtype
        self.block_size, self.num_blocks, self.dtype, self.storage = block_size, num_blocks, dtype, storage
        self.device = torch.device(device)
        # `capacity` blocks are addressable (reserved with empty(): pages are committed only as blocks are used);
        # the first `num_blocks` are the pool's now (the ledger counts those). Growing is raising num_blocks;
        # shrinking discards the pages of the blocks given up.
        self.capacity = max(capacity or num_blocks, num_blocks)
        self.int8 = storage == torch.int8
        self.block_bytes = block_nbytes(cfg, block_size, storage)  # every layer's K and V (and scales) of a block
        shape = (cfg.num_layers, cfg.num_kv_heads, self.capacity, block_size, cfg.head_dim)
        self.k: torch.Tensor | None = torch.empty(shape, dtype=storage, device=device)
        self.v: torch.Tensor | None = torch.empty(shape, dtype=storage, device=device)
        # int8: scales per token and head, [layers, nkv, num_blocks, block_size]; fp16 (2 B) keeps int8 KV at
        # 66 B per token & head for hd 64, 1.94x smaller than bf16 (fp32 scales would give 1.88x)
        scale = (lambda: torch.empty(shape[:-1], dtype=torch.float16, device=device)) if self.int8 else (lambda: None)
        self.k_scale: torch.Tensor | None = scale()
        self.v_scale: torch.Tensor | None = scale()

    def _tensors(self) -> list[torch.Tensor]:
        """K, V, and the int8 scales when there are any: everything a block spans, in payload order."""
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else self.num_blocks * self.block_bytes

    def zero(self, block: int) -> None:
        for t in self._tensors():
            t[:, :, block].zero_()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [N] (block * block_size + offset); k, v [nkv, N, hd]."""
        for pool, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            flat = pool[layer].flatten(1, 2)  # [nkv, num_blocks*block_size, hd] (a view)
            if self.int8:
                # symmetric, per token and head; the scale is rounded to fp16 *before* quantising, so values
                # are quantised against exactly the scale that is stored
                s = (x.float().abs().amax(dim=-1).clamp_min(1e-4) / 127).half()  # [nkv, N]
                q = torch.round(x.float() / s.float()[..., None]).clamp_(-127, 127).to(torch.int8)
                flat.index_copy_(1, slots, q)
                scale[layer].flatten(1, 2).index_copy_(1, slots, s)
            else:
                flat.index_copy_(1, slots, x.to(pool.dtype))

    def gather(self, layer: int, ids: torch.Tensor, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B*nb] block ids (B tables of nb, flattened) -> k, v [B, nkv, length, hd] in the compute dtype,
        positions < length."""
        out = []
        nb = ids.numel() // b
        for pool, scale in ((self.k, self.k_scale), (self.v, self.v_scale)):
            x = pool[layer].index_select(1, ids)  # [nkv, B*nb, bs, hd]
            if self.int8:
                s = scale[layer].index_select(1, ids)  # [nkv, B*nb, bs]
                x = x.to(self.dtype) * s[..., None].to(self.dtype)
            elif x.dtype != self.dtype:
                x = x.to(self.dtype)
            x = x.view(x.shape[0], b, nb * self.block_size, x.shape[-1]).transpose(0, 1)  # [B, nkv, nb*bs, hd]
            out.append(x[:, :, :length])
        return out[0], out[1]

    def release(self) -> None:
        self.k = self.v = self.k_scale = self.v_scale = None

    def discard(self, lo: int, hi: int) -> int:
        """Hand the pages of blocks [lo, hi) back to the OS (CPU; their contents are gone: a block is zeroed
        when it is next allocated). Each (layer, head) strip holds those blocks contiguously. Returns bytes."""
        if self.k is None or self.k.device.type != "cpu" or hi <= lo:
            return 0
        done = 0
        for t in self._tensors():
            item, (s0, s1, s2) = t.element_size(), t.stride()[:3]
            for layer in range(t.shape[0]):
                for head in range(t.shape[1]):
                    start = t.data_ptr() + (layer * s0 + head * s1 + lo * s2) * item
                    done += allocator.discard(start, (hi - lo) * s2 * item)
        return done

    def _parts(self, block: int) -> list[torch.Tensor]:
        return [t[:, :, block] for t in self._tensors()]  # [layers, nkv, bs(, hd)] each

    def read_block(self, block: int) -> bytes:
        """Every layer's K and V (and scales) of one block, as raw bytes."""
        return b"".join(p.contiguous().cpu().view(torch.uint8).numpy().tobytes() for p in self._parts(block))

    def write_block(self, block: int, payload: bytes) -> None:
        """The inverse of read_block."""
        if len(payload) != self.block_bytes:
            raise ValueError(f"a block is {self.block_bytes} bytes, got {len(payload)}")
        off = 0
        for p in self._parts(block):
            n = p.numel() * p.element_size()
            src = torch.frombuffer(bytearray(payload[off:off + n]), dtype=torch.uint8).view(p.dtype).view(p.shape)
            p.copy_(src)
            off += n

