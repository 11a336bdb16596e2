"""The one small protocol every KV tier below the device pool speaks (host RAM, local disk, a shared Redis), so
restores walk a list of tiers instead of a hard-coded chain:

    contains(hashes) -> [bool]        which blocks it has: one batched question (one round trip for Redis)
    get_many(wanted) -> [block|None]  fetch several blocks at once, each verified against its hash and tokens
    put(block)                        offer a block (a tier may keep, spill or drop it; never raises)
    cost(nbytes, count) -> seconds    predicted time to fetch `count` blocks of `nbytes`: restore or recompute

A miss, a corrupt value or an unreachable tier answers False / None: the caller recomputes, never fails.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

from tierlm.kvcache.block_file import StoredBlock

Wanted = tuple[bytes, tuple[int, ...]]  # (chain hash, the block's tokens)


class KVTier(Protocol):
    name: str

    def contains(self, hashes: Sequence[bytes]) -> list[bool]: ...

    def get_many(self, wanted: Sequence[Wanted]) -> list[StoredBlock | None]: ...

    def put(self, block: StoredBlock) -> None: ...

    def cost(self, nbytes: int, count: int) -> float: ...


def until_miss(wanted: Sequence[Wanted], get: Callable[[bytes, tuple[int, ...]], StoredBlock | None]
               ) -> list[StoredBlock | None]:
    """get_many for a tier read one block at a time: up to the first miss (a restore stops there; the blocks
    after it are not read, or taken out of the tier)."""
    out: list[StoredBlock | None] = [None] * len(wanted)
    for i, (h, tokens) in enumerate(wanted):
        out[i] = get(h, tokens)
        if out[i] is None:
            break
    return out
