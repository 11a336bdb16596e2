"""One forward step over paged sequences: positions for rope, K/V writes into the pool, gathered reads.

Attention reads K/V through the block tables: on CPU the step gathers each sequence's blocks into
[B, nkv, S, hd] (index_select over the block axis, one copy per layer), masks padding and future positions,
and the model runs SDPA on that. Tables of shorter sequences are padded with their own first block
(finite, masked).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from tierlm.model.llama import BlockMask

if TYPE_CHECKING:  # paged.py imports this module
    from tierlm.kvcache.paged import PagedKV, Sequence

DROPPED = -1  # a block-table entry whose block a sliding window freed


def attention_mask(positions: torch.Tensor, s: int, window: int | None) -> torch.Tensor | None:
    """Bool [B, 1, T, S], True where the query at positions[b, i] may see key j (j <= position, and within
    the window); None when nothing is hidden: one sequence, one new token (callers read S = its position + 1
    keys), all of them in its window."""
    b, t = positions.shape
    if b == 1 and t == 1 and (window is None or s <= window):
        return None
    k_pos = torch.arange(s, device=positions.device)  # [S]
    q_pos = positions[:, :, None]  # [B, T, 1]
    mask = k_pos <= q_pos  # [B, T, S]
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask[:, None]


class PagedStep:
    """One forward step over B sequences, T new tokens each: positions for rope, K/V writes and reads."""

    def __init__(self, kv: PagedKV, seqs: list[Sequence], t: int, batch_invariant: bool = False):
        self.kv, self.seqs, self.t = kv, seqs, t
        dev, bs = kv.device, kv.block_size
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
        # causal and sliding window; it also hides each shorter sequence's padding (keys past its position)
        # The engine's steps (no sliding window) get a BlockMask, attended by
        # llama.blocked_attention, whose rows depend neither on the batch nor on the chunk (outputs must not
        # depend on what else runs, on prefix hits or on preemption). valid [B, T, nb*bs]: key j is visible to
        # token t of sequence b (j <= its position). The others get the causal / window / padding mask for SDPA.
        self._nb = nb
        self.block_mask = self.mask = None
        if batch_invariant and kv.config.sliding_window is None:
            self.block_mask = BlockMask.of(self.positions, nb, bs)  # valid [B, T, nb*bs]
        else:
            self.mask = attention_mask(self.positions, self.length, kv.config.sliding_window)

    @functools.cached_property
    def tables(self) -> torch.Tensor:
        """[B, nb] int32 block tables for the native layer step, which reads keys where they lie (made once per
        step, when it runs; not under a sliding window, whose tables have dropped entries)."""
        return self.block_ids.view(len(self.seqs), self._nb).to(torch.int32)

    def layer(self, i: int) -> "PagedStep.Layer":
        return PagedStep.Layer(self, i)

    class Layer:
        def __init__(self, step: "PagedStep", i: int):
            self.step, self.i = step, i

        def update(self, k: torch.Tensor, v: torch.Tensor):
            """k, v [B, nkv, T, hd] -> (k_all, v_all [B, nkv, S, hd], mask [B, 1, T, S] | None); for a per-sequence
            step, lists of B (k, v [1, nkv, S_b, hd]) and mask None: each sequence's keys exactly as alone."""
            st = self.step
            pool = st.kv.pool
            pool.write(self.i, st.slots, k.transpose(0, 1).flatten(1, 2), v.transpose(0, 1).flatten(1, 2))
            k_all, v_all = pool.gather(self.i, st.block_ids, len(st.seqs), st.length)
            # blocked attention zero-pads the keys to whole groups itself (hidden by its mask)
            return k_all, v_all, st.block_mask if st.block_mask is not None else st.mask

    def finish(self) -> None:
        """The step's K/V are stored: advance each sequence, register its newly full blocks, and, under a
        sliding window W, free the blocks no later query can see (every key <= num_computed - W): they stay
        cached for prefix hits, but the sequence no longer holds them."""
        bs, man, window = self.kv.block_size, self.kv.manager, self.kv.config.sliding_window
        for s in self.seqs:
            s.num_computed += self.t
            while (s.num_hashed + 1) * bs <= s.num_computed:
                b = s.num_hashed
                tokens = tuple(s.tokens[b * bs:(b + 1) * bs])
                parent, s.parent_hash = s.parent_hash, man.register(s.blocks[b], s.parent_hash, tokens)
                s.num_hashed += 1
                if self.kv.tiers.writes_through:  # shared with other replicas at once (read and written behind)
                    self.kv.offer_remote(s.blocks[b], s.parent_hash, parent, tokens)
            while window is not None and s.num_dropped < s.num_hashed and \
                    (s.num_dropped + 1) * bs - 1 <= s.num_computed - window:
                man.release(s.blocks[s.num_dropped])
                s.blocks[s.num_dropped] = DROPPED
                s.num_dropped += 1
