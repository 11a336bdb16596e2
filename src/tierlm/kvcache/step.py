"""One forward step over paged sequences: positions for rope, K/V writes into the pool, gathered reads.

Attention reads K/V through the block tables: the Python layer gets each sequence's blocks gathered into
[B, nkv, S, hd] (index_select over the block axis, one copy per layer) with a BlockMask, and attends with
kvcache/attention.py's blocked_attention, whose rows depend neither on the batch nor on the chunk; under a
sliding window it gets the causal / window / padding mask and runs SDPA. The native layer step reads the
blocks where they lie (tables). Tables of shorter sequences are padded with their own newest block (finite,
masked).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from tierlm.kvcache.attention import BlockMask, attention_mask
from tierlm.kvcache.pool import KVPool
from tierlm.kvcache.sequence import DROPPED, KVSequence


class PagedStep:
    """One forward step over B sequences, T new tokens each: positions for rope, K/V writes and reads."""

    def __init__(self, pool: KVPool, window: int | None, seqs: list[KVSequence], t: int,
                 on_finish: Callable[["PagedStep"], None]):
        """pool: where K/V are written and read; window: the model's sliding window (None: none); on_finish: what
        finish() does once the step's K/V are stored (PagedKV.finish: advance and register the sequences)."""
        self.pool, self.window, self.seqs, self.t, self._on_finish = pool, window, seqs, t, on_finish
        dev, bs = pool.device, pool.block_size
        starts = torch.tensor([s.num_computed for s in seqs])  # [B]
        self.positions = (starts[:, None] + torch.arange(t)).to(dev)  # [B, T]
        pos = self.positions.cpu()
        tables = [s.blocks for s in seqs]
        slots = torch.stack([torch.tensor(tb)[pos[i] // bs] * bs + pos[i] % bs for i, tb in enumerate(tables)])
        self.slots = slots.flatten().to(dev)  # [B*T], sequence-major
        self.length = int(pos[:, -1].max()) + 1  # S: keys read per sequence (padded to the longest)
        nb = -(-self.length // bs)
        # [B, nb]: padding, and blocks a sliding window dropped (DROPPED), read the sequence's newest block:
        # finite values, every one of them masked
        self.block_ids = torch.tensor([[b if b != DROPPED else tb[-1] for b in tb[:nb]] + tb[-1:] * (nb - len(tb[:nb]))
                                       for tb in tables], device=dev).flatten()  # [B*nb], read by every layer
        # Without a sliding window a step gets a BlockMask, attended by attention.blocked_attention, whose rows
        # depend neither on the batch nor on the chunk (outputs must not depend on what else runs, on prefix hits
        # or on preemption): valid [B, T, nb*bs], key j visible to token t of sequence b (j <= its position).
        # Under a sliding window: the causal / window mask for SDPA, which also hides each shorter sequence's
        # padding (keys past its position).
        self._nb = nb
        self._windowed: dict[int, BlockMask] = {}
        self.block_mask = self.mask = None
        if window is None:
            self.block_mask = BlockMask.of(self.positions, nb, bs)  # valid [B, T, nb*bs]
        else:
            self.mask = attention_mask(self.positions, self.length, window)

    @functools.cached_property
    def tables(self) -> torch.Tensor:
        """[B, nb] int32 block tables for the native layer step, which reads keys where they lie (made once per
        step, when it runs; not under a sliding window, whose tables have dropped entries)."""
        return self.block_ids.view(len(self.seqs), self._nb).to(torch.int32)

    def windowed_mask(self, window: int) -> BlockMask:
        """The step's BlockMask also hiding keys at or before position - window: a local layer's (Gemma 3), whose
        model keeps every token in the cache for its global layers. Made once per step and window."""
        if window not in self._windowed:
            self._windowed[window] = BlockMask.of(self.positions, self._nb, self.pool.block_size, window)
        return self._windowed[window]

    def layer(self, i: int) -> "PagedStep.Layer":
        return PagedStep.Layer(self, i)

    class Layer:
        def __init__(self, step: "PagedStep", i: int):
            self.step, self.i = step, i

        def update(self, k: torch.Tensor, v: torch.Tensor, window: int | None = None):
            """k, v [B, nkv, T, hd] -> (k_all, v_all [B, nkv, S, hd], the step's BlockMask, or its SDPA mask
            [B, 1, T, S] | None under the model's sliding window). window: this layer's own (a local layer of a
            model whose cache keeps every token): its keys further back are hidden by the BlockMask."""
            st = self.step
            pool = st.pool
            pool.write(self.i, st.slots, k.transpose(0, 1).flatten(1, 2), v.transpose(0, 1).flatten(1, 2))
            k_all, v_all = pool.gather(self.i, st.block_ids, len(st.seqs), st.length)
            # blocked attention zero-pads the keys to whole groups itself (hidden by its mask)
            if st.block_mask is None:
                return k_all, v_all, st.mask
            return k_all, v_all, st.block_mask if window is None else st.windowed_mask(window)

    def finish(self) -> None:
        """The step's K/V are stored: hand it to its cache (advance each sequence, register its full blocks)."""
        self._on_finish(self)
