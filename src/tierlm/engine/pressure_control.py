"""Graded responses to memory pressure (memory/pressure.py's levels), applied by the engine loop's thread.

    normal     the host KV tier at its configured capacity, admissions open
    elevated   the host KV tier shrunk to half: its least recently used cached blocks spill to disk
    high       the host KV tier emptied to disk (cached prefixes survive there; nothing running is touched);
               with --migrate, one resident layer more streams (its bytes are given back), on entering the level
    critical   admissions paused and new requests refused (503 + Retry-After at the server); the most
               recently admitted request is preempted: its blocks go back, it waits first in line and is
               recomputed (or restored) when the pressure falls. Nothing accepted is lost.

From elevated up, layer migration (offload/migration.py) is frozen: no promotions, no pool growth into
budget the ledger shows free (the OS says otherwise). Every transition is a ledger event ("pressure") and
counted.
"""
from __future__ import annotations

import logging
from typing import Callable

from tierlm.engine.engine import Engine
from tierlm.memory.ledger import MemoryLedger
from tierlm.memory.pressure import Level, level_of, read_memory

log = logging.getLogger("tierlm.pressure")


class PressureControl:
    def __init__(self, engine: Engine, ledger: MemoryLedger | None = None,
                 read: Callable[[], tuple[int, int, str]] = read_memory):
        self.engine, self.ledger, self.read = engine, ledger, read
        self.level, self.fraction, self.source = Level.NORMAL, 0.0, ""
        self.transitions = 0
        self._host_capacity = engine.kv.tiers.host_bytes

    def check(self) -> Level:
        """Read the OS, move between levels, apply the new level's response. The loop's thread only."""
        used, limit, self.source = self.read()
        self.fraction = used / limit if limit else 0.0
        new = level_of(self.fraction, self.level)
        if new != self.level:
            log.warning("memory pressure %s -> %s (%.0f%% of the %s limit)", self.level.name, new.name,
                        100 * self.fraction, self.source)
            self.transitions += 1
            if self.ledger is not None:
                self.ledger.note("pressure", new.name.lower(), "cpu", used)
            entering_critical = new == Level.CRITICAL
            self.level = new
            self._apply(entering_critical)
        return self.level

    def _apply(self, entering_critical: bool) -> None:
        tiers, sched = self.engine.kv.tiers, self.engine.scheduler
        host = {Level.NORMAL: self._host_capacity, Level.ELEVATED: self._host_capacity // 2}.get(self.level, 0)
        tiers.set_host_limit(host)
        sched.pause_admissions(self.level == Level.CRITICAL)
        if (m := self.engine.migrator) is not None:
            m.frozen = self.level >= Level.ELEVATED
            if self.level >= Level.HIGH and (freed := m.shed(1)):
                log.warning("memory pressure: one more layer streams, %d bytes given back", freed)
        if entering_critical and (victim := sched.preempt_newest()) is not None:
            log.warning("memory pressure: preempted %s", victim.id)
