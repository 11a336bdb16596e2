"""The paged KV cache: one preallocated pool of fixed-size blocks, block tables per sequence.

    pool k, v: [layers, nkv, num_blocks, block_size, hd]   (int8 KV: int8 values + fp16 scales
                                                            [layers, nkv, num_blocks, block_size], per token & head)
    sequence:  block table [b0, b1, ...]: token p lives in block table[p // block_size], slot p % block_size

Attention reads K/V through the table: on CPU the step gathers the sequence's blocks into [B, nkv, S, hd]
(index_select over the block axis, one copy per layer), masks padding and future positions, and runs SDPA.
The pool is reserved with empty() (pages are committed as blocks are first used) and a block is zeroed
when it is allocated: a masked read of a never-written slot must be finite, because a masked score times a
NaN value is still NaN. Tables of shorter sequences are padded with their own first block (finite, masked).

Lifetimes: the pool is reserved by PagedKV(...) and freed by release(); blocks are taken and returned
through the BlockManager (blocks.py) as sequences grow and finish.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tierlm.config import ModelConfig
from tierlm.errors import ContextLengthError
from tierlm.kvcache.blocks import ROOT_HASH, BlockManager

DEFAULT_BLOCK_SIZE = 16


def block_nbytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype, int8: bool) -> int:
    """Bytes of one block across every layer, K and V (int8: 1 B per value + a 2 B scale per token & head)."""
    per_token_head = cfg.head_dim * (1 if int8 else dtype.itemsize) + (2 if int8 else 0)
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * per_token_head


@dataclass(eq=False)
class Sequence:
    """One sequence's tokens and blocks. `num_computed` tokens have K/V in the pool."""
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    parent_hash: bytes = ROOT_HASH  # chain hash of the last registered (full) block
    num_hashed: int = 0  # blocks registered in the prefix cache


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", int8: bool = False):
        self.block_size, self.dtype, self.int8 = block_size, dtype, int8
        shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
        store = torch.int8 if int8 else dtype
        self.k: torch.Tensor | None = torch.empty(shape, dtype=store, device=device)
        self.v: torch.Tensor | None = torch.empty(shape, dtype=store, device=device)
        if int8:  # per token and head: [layers, nkv, num_blocks, block_size]; fp16 (2 B) keeps int8 KV at
            # 66 B per token & head for hd 64, 1.94x smaller than bf16 (fp32 scales would give 1.88x)
            self.k_scale: torch.Tensor | None = torch.empty(shape[:-1], dtype=torch.float16, device=device)
            self.v_scale: torch.Tensor | None = torch.empty(shape[:-1], dtype=torch.float16, device=device)

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        n = 2 * self.k.numel() * self.k.element_size()
        return n + (2 * self.k_scale.numel() * 2 if self.int8 else 0)

    def zero(self, block: int) -> None:
        for t in (self.k, self.v, *((self.k_scale, self.v_scale) if self.int8 else ())):
            t[:, :, block].zero_()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [N] (block * block_size + offset); k, v [nkv, N, hd]."""
        for pool, scale, x in ((self.k, getattr(self, "k_scale", None), k), (self.v, getattr(self, "v_scale", None), v)):
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

    def gather(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tables [B, nb] block ids -> k, v [B, nkv, length, hd] (in the compute dtype) for positions < length."""
        out = []
        for pool, scale in ((self.k, getattr(self, "k_scale", None)), (self.v, getattr(self, "v_scale", None))):
            b, nb = tables.shape
            x = pool[layer].index_select(1, tables.flatten())  # [nkv, B*nb, bs, hd]
            if self.int8:
                s = scale[layer].index_select(1, tables.flatten())  # [nkv, B*nb, bs]
                x = (x.to(self.dtype) * s[..., None].to(self.dtype))
            x = x.view(x.shape[0], b, nb * self.block_size, x.shape[-1]).transpose(0, 1)  # [B, nkv, nb*bs, hd]
            out.append(x[:, :, :length])
        return out[0], out[1]

    def release(self) -> None:
        self.k = self.v = None
        if self.int8:
            self.k_scale = self.v_scale = None


class PagedKV:
    """The pool plus its block manager: what schedulers and the runner use."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", int8: bool = False,
                 caching: bool = True, salt: bytes = b""):
        self.config, self.block_size, self.device = cfg, block_size, torch.device(device)
        self.pool = KVPool(cfg, num_blocks, block_size, dtype, device, int8)
        self.manager = BlockManager(num_blocks, block_size, salt, caching)

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    def blocks_needed(self, seq: Sequence, new_tokens: int) -> int:
        """Blocks to allocate before `new_tokens` more tokens of seq can be stored."""
        need = -(-(seq.num_computed + new_tokens) // self.block_size)
        return max(0, need - len(seq.blocks))

    def admit(self, seq: Sequence) -> None:
        """Attach the cached blocks of seq's longest cached prefix (prefill then starts after them)."""
        assert not seq.blocks
        seq.blocks, seq.parent_hash = self.manager.match_prefix(seq.tokens)
        seq.num_computed = seq.num_hashed = len(seq.blocks)
        seq.num_computed *= self.block_size

    def free(self, seq: Sequence) -> None:
        """Return seq's blocks; its full, hashed ones stay cached until reused."""
        self.manager.release_all(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_hashed, seq.parent_hash = [], 0, 0, ROOT_HASH

    def batch(self, seqs: list[Sequence]) -> "Batch":
        return Batch(self, seqs)

    def begin(self, seqs: list[Sequence], t: int) -> "PagedStep":
        """A forward step of t new tokens for each of seqs (tokens seq.tokens[num_computed:num_computed+t])."""
        for s in seqs:
            if s.num_computed + t > len(s.tokens):
                raise ValueError("a step past the sequence's known tokens")
            for _ in range(self.blocks_needed(s, t)):
                s.blocks.append(block := self.manager.allocate())
                self.pool.zero(block)
        return PagedStep(self, seqs, t)

    def release(self) -> None:
        self.pool.release()


class PagedStep:
    """One forward step over B sequences, T new tokens each: positions for rope, K/V writes and reads."""

    def __init__(self, kv: PagedKV, seqs: list[Sequence], t: int):
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
        self.tables = torch.tensor([tb[:nb] + tb[:1] * (nb - len(tb[:nb])) for tb in tables], device=dev)  # [B, nb]
        window = kv.config.sliding_window
        k_pos = torch.arange(self.length, device=dev)  # [S]
        if len(seqs) == 1 and t == 1 and (window is None or self.length <= window):
            self.mask = None  # one new token of one sequence attends everything stored
        else:
            q_pos = self.positions[:, :, None]  # [B, T, 1]
            mask = k_pos <= q_pos  # [B, T, S]: causal, and hides padding beyond each sequence's length
            if window is not None:
                mask &= k_pos > q_pos - window
            self.mask = mask[:, None]  # [B, 1, T, S]

    def layer(self, i: int) -> "PagedStep.Layer":
        return PagedStep.Layer(self, i)

    class Layer:
        def __init__(self, step: "PagedStep", i: int):
            self.step, self.i = step, i

        def update(self, k: torch.Tensor, v: torch.Tensor):
            """k, v [B, nkv, T, hd] -> (k_all, v_all [B, nkv, S, hd], mask [B, 1, T, S] | None)."""
            st = self.step
            pool = st.kv.pool
            pool.write(self.i, st.slots, k.transpose(0, 1).flatten(1, 2), v.transpose(0, 1).flatten(1, 2))
            k_all, v_all = pool.gather(self.i, st.tables, st.length)
            return k_all, v_all, st.mask

    def finish(self) -> None:
        """The step's K/V are stored: advance each sequence and register its newly full blocks."""
        bs, man = self.kv.block_size, self.kv.manager
        for s in self.seqs:
            s.num_computed += self.t
            while (s.num_hashed + 1) * bs <= s.num_computed:
                b = s.num_hashed
                s.parent_hash = man.register(s.blocks[b], s.parent_hash, tuple(s.tokens[b * bs:(b + 1) * bs]))
                s.num_hashed += 1


class Batch:
    """Sequences stepped together by the runner: their next tokens are already in seq.tokens."""

    def __init__(self, kv: PagedKV, seqs: list[Sequence]):
        self.kv, self.seqs = kv, seqs

    def step(self, tokens: torch.Tensor) -> PagedStep:
        """tokens [B, T]: must be each sequence's next T tokens."""
        return self.kv.begin(self.seqs, tokens.shape[1])


class SequenceKV:
    """One sequence with its own small pool: the single-request path (generate, eval-ppl, bench).
    `capacity` tokens at most; tokens are appended as the runner steps (`length` = tokens stored)."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 block_size: int = DEFAULT_BLOCK_SIZE, int8: bool = False):
        self.capacity = capacity
        self.paged = PagedKV(cfg, -(-capacity // block_size), block_size, dtype=dtype, device=device, int8=int8,
                             caching=False)
        self.seq = Sequence(tokens=[])

    @property
    def length(self) -> int:
        return self.seq.num_computed

    @property
    def nbytes(self) -> int:
        return self.paged.nbytes

    def step(self, tokens: torch.Tensor) -> PagedStep:
        """A forward step appending tokens [1, T]."""
        end = self.seq.num_computed + tokens.shape[1]
        if end > self.capacity:
            raise ContextLengthError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        self.seq.tokens.extend(tokens[0].tolist())
        return self.paged.begin([self.seq], tokens.shape[1])

    def release(self) -> None:
        self.paged.release()
