"""One sequence's view of the paged KV cache: its tokens, its block table and how far its K/V are computed."""
from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.kvcache.blocks import ROOT_HASH

DROPPED = -1  # a block-table entry whose block a sliding window freed


@dataclass(eq=False)
class KVSequence:
    """One sequence's tokens and blocks. `num_computed` tokens have K/V in the pool."""
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    parent_hash: bytes = ROOT_HASH  # chain hash of the last registered (full) block
    num_hashed: int = 0  # blocks registered in the prefix cache
    num_dropped: int = 0  # leading blocks freed because a sliding window hides them (table entries DROPPED)

    @property
    def held(self) -> list[int]:
        """The blocks this sequence holds (not the dropped ones)."""
        return [b for b in self.blocks if b != DROPPED]
