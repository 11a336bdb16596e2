"""The memory ledger: every budget-governed allocation is a Reservation of (owner, tier, bytes) with an
explicit lifetime, checked against one budget per tier (from max_memory).

    reserve(owner, tier, nbytes) -> Reservation        BudgetError if the tier's budget would be exceeded
    Reservation.resize(nbytes) / .release()            the owner's size changed / the memory is gone

Owners (the names the ledger, `--stats` and /metrics use):
    weights      resident weight units (and fixed tensors: norms, rope tables)
    ring         the streamer's slots (pinned staging on CUDA: owner "staging", tier cpu)
    kv_pool      the paged KV pool
    kv_host      the host-RAM KV tier (its capacity; usage is the tier's own counter)
    kv_remote    the shared KV tier's buffers (one write batch, one fetch batch)
    requests     the bodies a server reads and parses (its capacity; usage is serve/guard.BodyBudget's)
    workspace    the layer intermediates' arena (re-planned wider at run time: resized)
    activations  kernel outputs and transients of one step (the planner's estimate: they are not pooled)

Tiers: the ledger's tiers are "cpu", "cuda" and "disk", the keys of max_memory as Accelerate spells them
(one budget each; "cuda" for any CUDA device). They say whose memory a reservation is charged to, and are
not the weight placement's offload.tier.Tier (DEVICE / HOST / DISK: where a weight unit is read from; on a
CPU, DEVICE and HOST are both "cpu" here) nor the KV tiers below the pool (host / disk / remote,
kvcache/tier_stack.py). Callers map a torch device to "cuda" or "cpu"; no Tier value is ever a ledger tier.

The planner's placement becomes the first reservations (before anything is allocated, so a budget that
cannot hold it fails before a byte is read); the owners resize them to what they really allocated. The
ledger is thread-safe: the server's metrics read it while the engine thread changes it. Every change is
also an event (time, kind, owner, tier, bytes) for the memory timeline.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from tierlm.config import format_size
from tierlm.errors import BudgetError

TIERS = ("cpu", "cuda", "disk")  # max_memory's keys (Accelerate's), one budget each; not offload.tier.Tier


@dataclass(frozen=True)
class LedgerEvent:
    t: float  # seconds since the ledger was made
    kind: str  # reserve | resize | release
    owner: str
    tier: str
    nbytes: int  # the reservation's size after the event (0 after release)


class Reservation:
    """Bytes one owner holds on one tier. Invariant: counted in the ledger exactly while not released."""

    def __init__(self, ledger: "MemoryLedger", owner: str, tier: str, nbytes: int):
        self.ledger, self.owner, self.tier, self.nbytes = ledger, owner, tier, nbytes
        self.released = False

    def resize(self, nbytes: int, check: bool = True) -> None:
        """Grow or shrink; growing past the tier's budget is a BudgetError unless `check` is False (recording
        what an owner has already allocated)."""
        self.ledger._resize(self, nbytes, check=check)

    def release(self) -> None:
        if not self.released:
            self.ledger._resize(self, 0, release=True)

    def __repr__(self) -> str:
        return f"Reservation({self.owner}, {self.tier}, {format_size(self.nbytes)})"


class MemoryLedger:
    def __init__(self, budgets: dict[str, int | None] | None = None, keep_events: int = 100_000):
        self.budgets = {t: (budgets or {}).get(t) for t in TIERS}  # None: no limit on that tier
        self._live: list[Reservation] = []
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self.events: list[LedgerEvent] = []
        self._keep = keep_events
        self.tracing = False  # note() events too (--memory-trace); reservation events are always kept

    def reserve(self, owner: str, tier: str, nbytes: int, check: bool = True) -> Reservation:
        """A new reservation; with `check`, BudgetError when it would take the tier past its budget."""
        if tier not in TIERS or nbytes < 0:
            raise ValueError(f"bad reservation {owner} {tier} {nbytes}")
        r = Reservation(self, owner, tier, 0)
        with self._lock:
            self._live.append(r)
        try:
            self._resize(r, nbytes, check=check, kind="reserve")
        except BudgetError:
            with self._lock:
                self._live.remove(r)
            r.released = True
            raise
        return r

    def _resize(self, r: Reservation, nbytes: int, check: bool = False, release: bool = False,
                kind: str = "resize") -> None:
        if r.released:
            raise ValueError(f"{r} was released")
        with self._lock:
            budget = self.budgets[r.tier]
            if check and budget is not None and nbytes > r.nbytes:
                used = sum(x.nbytes for x in self._live if x.tier == r.tier)
                if used - r.nbytes + nbytes > budget:
                    raise BudgetError(f"{r.owner} needs {format_size(nbytes)} of {r.tier} memory, but only "
                                      f"{format_size(budget - used + r.nbytes)} of the {format_size(budget)} "
                                      f"budget is free")
            r.nbytes = nbytes
            if release:
                r.released = True
                self._live.remove(r)
            if len(self.events) < self._keep:
                self.events.append(LedgerEvent(time.perf_counter() - self._t0, "release" if release else kind,
                                               r.owner, r.tier, nbytes))

    def note(self, kind: str, owner: str, tier: str, nbytes: int) -> None:
        """An event that is not a reservation change (usage of a reservation, an eviction, a pressure level)
        for the timeline; kept only while `tracing`."""
        if self.tracing and len(self.events) < self._keep:
            with self._lock:
                self.events.append(LedgerEvent(time.perf_counter() - self._t0, kind, owner, tier, nbytes))

    def used(self, tier: str) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._live if r.tier == tier)

    def by_owner(self) -> dict[tuple[str, str], int]:
        """(owner, tier) -> bytes reserved now."""
        out: dict[tuple[str, str], int] = {}
        with self._lock:
            for r in self._live:
                out[(r.owner, r.tier)] = out.get((r.owner, r.tier), 0) + r.nbytes
        return out

    def describe(self) -> str:
        """A table: bytes by owner and tier, the totals and the budgets."""
        rows = sorted(self.by_owner().items(), key=lambda kv: (kv[0][1], -kv[1]))
        lines = [f"  {owner:<12} {tier:<5} {format_size(n):>10}" for (owner, tier), n in rows if n]
        for tier in TIERS:
            used, budget = self.used(tier), self.budgets[tier]
            if used or budget is not None:
                lines.append(f"  {'total':<12} {tier:<5} {format_size(used):>10}"
                             + (f"  of {format_size(budget)} budget" if budget is not None else ""))
        return "memory ledger (reserved now):\n" + "\n".join(lines)
