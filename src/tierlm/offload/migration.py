"""Memory that moves to where the work is: resident weight layers <-> KV blocks, inside one budget.

    requests wait for KV blocks  ->  demote resident layers (they stream from the offload store), grow the pool
    the pool has room to spare   ->  shrink the pool, promote the layers demoted last (read back, verified)

The decision is the planner's cost model (pure functions here): a demotion is taken when the decode
throughput it buys, (running + sequences gained) / predicted s per step, beats today's running / s per step
by MARGIN; sequences gained = the bytes freed over what a waiting request needs. Budget no one holds is
used first (the pool grows at no cost). Promotions need no trade-off (nobody waits).
Hysteresis: a direction must be wanted for HOLD_STEPS engine steps in a row, moves are at least DWELL_S
apart, and the two triggers are a band apart (demote: the queue waits on a full pool; promote: the pool,
once shrunk, would be at most 1 - MARGIN full), so a load hovering at the edge does not flap. The pool never
shrinks below the size it started at (every accepted request was checked against that), nor grows past
its capacity. Outputs do not change: a layer's bytes are the same streamed or resident (WeightStore.promote
reads exactly what streams), and KV blocks do not move.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from tierlm.errors import BudgetError
from tierlm.memory.ledger import MemoryLedger, Reservation
from tierlm.offload.planner import Placement, PlanInput, predict, spread
from tierlm.offload.tier import Tier
from tierlm.offload.units import layer_unit

log = logging.getLogger("tierlm.migration")

MARGIN = 0.25
HOLD_STEPS = 4
DWELL_S = 2.0


@dataclass(frozen=True)
class Demand:
    """What the scheduler's queue asks of the pool right now."""
    running: int
    waiting: int
    short_blocks: int  # blocks the head of the queue lacks to be admitted (0: it is not waiting on KV)
    per_request_blocks: float  # mean blocks a waiting request needs (prompt + 1)
    used_blocks: int  # held by running requests
    pool_blocks: int


@dataclass(frozen=True)
class Move:
    demote: tuple[int, ...] = ()
    promote: tuple[int, ...] = ()
    pool_blocks: int = 0  # the pool's size after the move
    token_s: float = 0.0  # predicted seconds per decode step after it
    reason: str = ""


def recost(inp: PlanInput, p: Placement, resident: set[int], depth: int) -> Placement:
    """The placement with `resident` layers in memory and the rest streamed (pure)."""
    tiers = tuple(Tier.DEVICE if i in resident else Tier.DISK for i in range(inp.num_layers))
    return predict(inp, replace(p, layer_tiers=tiers, ring_depth=p.ring_depth or depth))


def _ring(inp: PlanInput, p: Placement, depth: int, streaming_layers: bool) -> int:
    k = p.ring_depth or depth
    return k * max(p.slot_bytes, inp.layer_bytes if streaming_layers else 0)


def decide_demote(inp: PlanInput, p: Placement, resident: list[int], d: Demand, block_bytes: int,
                  capacity_blocks: int, ring_now: int, depth: int = 2, budget_free: int | None = 0) -> Move | None:
    """Room for the head of the queue: from budget no one holds (no cost), else the fewest layers whose bytes
    admit it, if the throughput bought is worth it."""
    if d.short_blocks <= 0:
        return None
    room = capacity_blocks - d.pool_blocks
    if budget_free is None:  # no budget: the pool may grow to its capacity
        budget_free = room * block_bytes
    free_blocks = min(room, budget_free // block_bytes)
    if free_blocks >= d.short_blocks:
        want = d.short_blocks + int(d.per_request_blocks * (d.waiting - 1))  # room for the queue, if there is
        return Move(pool_blocks=d.pool_blocks + min(free_blocks, want), token_s=p.token_s, reason="budget free")
    if not resident:
        return None
    for k in range(1, len(resident) + 1):
        extra_ring = max(0, _ring(inp, p, depth, True) - ring_now)
        gained = (k * inp.layer_bytes - extra_ring) // block_bytes
        if gained >= d.short_blocks:
            break
    else:
        return None  # even every layer would not make room
    pool = min(capacity_blocks, d.pool_blocks + gained)
    if pool - d.pool_blocks < d.short_blocks:
        return None
    keep = spread(len(resident) - k, resident)  # what stays resident stays evenly spread (planner.spread)
    now, after = recost(inp, p, set(resident), depth), recost(inp, p, keep, depth)
    seqs = (pool - d.pool_blocks) / max(d.per_request_blocks, 1.0)
    before_rate = max(d.running, 1) / now.token_s
    after_rate = (d.running + min(seqs, d.waiting)) / after.token_s
    if after_rate < (1 + MARGIN) * before_rate:
        return None
    return Move(demote=tuple(sorted(set(resident) - keep)), pool_blocks=pool, token_s=after.token_s,
                reason=f"{d.waiting} waiting, {d.short_blocks} KV blocks short: {before_rate:.2f} -> "
                       f"{after_rate:.2f} sequences x steps/s")


def decide_promote(inp: PlanInput, p: Placement, resident: list[int], demoted: list[int], d: Demand,
                   block_bytes: int, floor_blocks: int, budget_free: int | None, ring_now: int = 0,
                   ring_goes: bool = False, depth: int = 2) -> Move | None:
    """The layers demoted last, back into memory, once nobody waits: as few as can be paid for by budget no
    one holds, by shrinking the pool (never below its floor; the shrunk pool at most 1 - MARGIN full) and, when
    the last streamed layer comes back (`ring_goes`: nothing else streams), by the ring it frees."""
    if not demoted or d.waiting or d.short_blocks:
        return None
    for j in range(1, len(demoted) + 1):
        back = ring_now if ring_goes and j == len(demoted) else 0
        need = j * inp.layer_bytes - back - (budget_free if budget_free is not None else j * inp.layer_bytes)
        new = d.pool_blocks - -(-max(need, 0) // block_bytes)
        if new < floor_blocks or d.used_blocks > (1 - MARGIN) * new:
            continue  # more layers at once may be payable (the ring goes with the last)
        layers = tuple(demoted[-j:])
        after = recost(inp, p, set(resident) | set(layers), depth)
        return Move(promote=layers, pool_blocks=new, token_s=after.token_s,
                    reason=f"{d.used_blocks} of {d.pool_blocks} KV blocks in use, nobody waiting")
    return None


class Migrator:
    """Applies moves between engine steps (the loop's thread). Owns nothing but the policy's state; the
    store, the pool and the ledger reservations ("weights", "ring", "kv_pool") are the owners it resizes."""

    def __init__(self, store, kv, inp: PlanInput, placement: Placement, reservations: dict[str, Reservation],
                 ledger: MemoryLedger, hold_steps: int = HOLD_STEPS, dwell_s: float = DWELL_S):
        self.store, self.kv, self.inp, self.placement = store, kv, inp, placement
        self.res, self.ledger = reservations, ledger
        self.hold_steps, self.dwell_s = hold_steps, dwell_s
        self.demoted: list[int] = []  # demoted by us, most recent last (promoted back in reverse)
        self.demotions = self.promotions = 0
        self.frozen = False  # memory pressure (engine/pressure_control.py): no promotions, no growing into free budget
        self._want: str | None = None
        self._streak = 0
        self._last = -float("inf")

    def demand(self, sched) -> Demand:
        """The queue as the scheduler's last admission saw it (its kv_short: no prefix hashed twice a step)."""
        man, short = self.kv.manager, sched.kv_short
        waiting = sched.waiting
        per = sum(-(-(len(r.seq.tokens) + 1) // self.kv.block_size) for r in waiting) / len(waiting) \
            if short and waiting else 0.0  # only a demotion weighs it
        return Demand(len(sched.running), len(waiting), short, per, man.num_blocks - man.num_free, man.num_blocks)

    def tick(self, sched) -> Move | None:
        """Called before each step: decide with hysteresis, apply. Returns the move made, if any."""
        d = self.demand(sched)
        want = "demote" if d.short_blocks else "promote" if self.demoted and not d.waiting and not self.frozen \
            else None
        self._streak = self._streak + 1 if want == self._want else 1
        self._want = want
        if want is None or self._streak < self.hold_steps or time.monotonic() - self._last < self.dwell_s:
            return None
        resident, depth = self.store.resident_layers(), self.store.stream_args[0]
        if want == "demote":
            move = decide_demote(self.inp, self.placement, resident, d, self.kv.pool.block_bytes,
                                 self.kv.manager.capacity, self.store.ring_nbytes, depth, self._budget_free())
        else:
            free = self._budget_free()
            move = decide_promote(self.inp, self.placement, resident, self.demoted, d, self.kv.pool.block_bytes,
                                  self.kv.manager.floor, free, self.store.ring_nbytes, self._ring_goes(), depth)
        if move is not None and self.apply(move):
            self._last, self._streak = time.monotonic(), 0
            return move
        return None

    def _ring_goes(self) -> bool:
        """Promoting every layer demoted here empties the stream (the head and every other layer resident)."""
        streamed = set(range(self.inp.num_layers)) - set(self.store.resident_layers())
        return self.store.head_tier == Tier.DEVICE and streamed == set(self.demoted)

    def _budget_free(self, ignore_frozen: bool = False) -> int | None:
        """Budget no reservation holds (under memory pressure: none, whatever the ledger says)."""
        if self.frozen and not ignore_frozen:
            return 0
        tier = self.res["weights"].tier
        budget = self.ledger.budgets[tier]
        return None if budget is None else max(0, budget - self.ledger.used(tier))

    def apply(self, move: Move) -> bool:
        """Make the move, keeping the ledger exact at every point: what is freed is released before what grows
        is reserved (checked against the budget). False when the pool cannot shrink now (blocks in use)."""
        r = self.res
        if move.demote:
            freed = self.store.demote(list(move.demote))
            r["weights"].resize(r["weights"].nbytes - freed, check=False)
            r["ring"].resize(self.store.ring_nbytes)
            self.demoted += list(move.demote)
            self.demotions += len(move.demote)
        target = move.pool_blocks
        if target > self.kv.manager.num_blocks and (room := self._budget_free(ignore_frozen=True)) is not None:
            # what was really freed: a layer loaded from the source holds its tensors' bytes, a little less than
            # the aligned extent the planner counts
            target = min(target, self.kv.manager.num_blocks + room // self.kv.pool.block_bytes)
        if target != self.kv.manager.num_blocks:
            shrinking = target < self.kv.manager.num_blocks
            if not self.kv.resize(target):
                return bool(move.demote)
            r["kv_pool"].resize(self.kv.nbytes, check=not shrinking)
        if move.promote:
            units = self.store.offload.units
            held = sum(units[layer_unit(i)].nbytes for i in move.promote)  # promote() holds exactly these extents
            ring = r["ring"].nbytes
            if self._ring_goes() and set(move.promote) == set(self.demoted):
                r["ring"].resize(0)  # promote() closes the streamer before it reads a byte
            try:
                r["weights"].resize(r["weights"].nbytes + held)  # before a byte is read
            except BudgetError as e:  # someone took the budget meanwhile (the pool shrank: nothing is lost)
                r["ring"].resize(ring, check=False)
                log.info("memory migration: promotion refused: %s", e)
                return True
            self.store.promote(list(move.promote))
            for i in move.promote:
                self.demoted.remove(i)
            r["ring"].resize(self.store.ring_nbytes, check=False)
            self.promotions += len(move.promote)
        self.placement = recost(self.inp, self.placement, set(self.store.resident_layers()), self.store.stream_args[0])
        self.ledger.note("migrate", "weights", r["weights"].tier, r["weights"].nbytes)
        log.info("memory migration: demoted %s promoted %s, KV pool %d blocks (%s)", list(move.demote),
                 list(move.promote), self.kv.manager.num_blocks, move.reason)
        return True

    def shed(self, layers: int = 1) -> int:
        """Memory pressure: demote `layers` resident layers (more when the stream needs a ring first: enough to
        free bytes net) and give their bytes back (the pool keeps its size); returns the bytes freed."""
        resident = self.store.resident_layers()
        ring_growth = max(0, _ring(self.inp, self.placement, self.store.stream_args[0], True) - self.store.ring_nbytes)
        layers += ring_growth // self.inp.layer_bytes
        if len(resident) < layers:
            return 0
        keep = spread(len(resident) - layers, resident)
        move = Move(demote=tuple(sorted(set(resident) - keep)), pool_blocks=self.kv.manager.num_blocks,
                    reason="memory pressure")
        before = self.res["weights"].nbytes + self.res["ring"].nbytes
        self.apply(move)
        self._last = time.monotonic()
        return before - self.res["weights"].nbytes - self.res["ring"].nbytes
