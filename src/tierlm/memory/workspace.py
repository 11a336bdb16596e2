"""The activation workspace: one preallocated arena, carved by a plan computed once from tensor lifetimes.

A forward step declares its intermediate buffers with lifetimes [first, last] (op indices within one layer
step, inclusive). Buffers whose lifetimes do not overlap may share bytes (interval colouring): offsets are
assigned greedily, largest buffer first, each at the lowest aligned offset that clears every placed buffer
it overlaps in time (the "greedy by size" offset planner of TFLite's memory planner). Planning is a pure
function; the Workspace reserves the arena once and hands out views, so a decode step allocates nothing
for these buffers.

Invariant (tested): two buffers live at the same op never share a byte, and the arena is never larger than
the sum of its buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tierlm.errors import UsageError

ALIGN = 64  # bytes: a cache line, and a multiple of every element size
MAX_CACHED_VIEWS = 512


@dataclass(frozen=True)
class BufferSpec:
    name: str
    nbytes: int
    first: int  # first op that writes it
    last: int  # last op that reads it

    def overlaps(self, other: "BufferSpec") -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class WorkspacePlan:
    specs: dict[str, BufferSpec]
    offsets: dict[str, int]
    nbytes: int  # arena size

    @property
    def naive_nbytes(self) -> int:
        """What one allocation per buffer would hold at once: the saving is naive_nbytes - nbytes."""
        return sum(s.nbytes for s in self.specs.values())


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_workspace(buffers: list[BufferSpec]) -> WorkspacePlan:
    """Offsets for every buffer such that buffers live at the same time are disjoint."""
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate buffer names in {names}")
    placed: list[tuple[BufferSpec, int]] = []
    offsets: dict[str, int] = {}
    for buf in sorted(buffers, key=lambda b: (-b.nbytes, b.first, b.name)):
        size = _align(buf.nbytes)
        # the busy byte ranges of buffers live during buf's lifetime, by start offset
        busy = sorted((off, off + _align(p.nbytes)) for p, off in placed if p.overlaps(buf))
        offset = 0
        for start, end in busy:
            if offset + size <= start:
                break  # fits in the gap before this range
            offset = max(offset, end)
        offsets[buf.name] = offset
        placed.append((buf, offset))
    total = max((off + _align(b.nbytes) for b, off in placed), default=0)
    return WorkspacePlan(specs={b.name: b for b in buffers}, offsets=offsets, nbytes=total)


class Workspace:
    """The arena for one plan on one device. Lifetime: reserve() at construction, release() when done;
    views stay valid until release, and a view's contents are only defined inside its buffer's lifetime."""

    def __init__(self, plan: WorkspacePlan, device: torch.device | str = "cpu"):
        self.plan = plan
        self.arena: torch.Tensor | None = torch.empty(plan.nbytes, dtype=torch.uint8, device=device)
        # Views by (name, shape, dtype): a decode step asks for the same ones every layer, and building a view
        # costs three torch calls (~3 us) where a dict hit costs ~0.1 us.
        self._views: dict[tuple, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return 0 if self.arena is None else self.arena.numel()

    def view(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A [shape] tensor of `dtype` over buffer `name` (its first bytes when the step is smaller than planned)."""
        key = (name, tuple(shape), dtype)
        if (cached := self._views.get(key)) is not None:
            return cached
        if self.arena is None:
            raise UsageError("workspace used after release()")
        n = math.prod(shape) * dtype.itemsize
        spec = self.plan.specs[name]
        if n > spec.nbytes:
            raise ValueError(f"workspace buffer {name!r} holds {spec.nbytes} B; {tuple(shape)} {dtype} needs {n} B")
        off = self.plan.offsets[name]
        if len(self._views) >= MAX_CACHED_VIEWS:
            self._views.clear()  # prefill chunks of many lengths: keep the cache bounded
        view = self._views[key] = self.arena[off:off + n].view(dtype).view(shape)
        return view

    def release(self) -> None:
        self.arena, self._views = None, {}
