"""The engine on its own thread, for the server: handlers on the event loop submit and abort requests and
await their updates; they never block on the engine.

    submit(ids, params, queue, index) -> EngineRequest   any thread; updates arrive in `queue` (asyncio)
    abort(request id)                                     any thread
    drain(deadline)                                       refuse new work (503), let running requests finish

With a PressureControl, the snapshot also checks memory pressure and applies its level's response
(engine/pressure_control.py); at critical, new requests get 503 with Retry-After.

The thread steps the engine while it has work and sleeps on an event otherwise. A step that raises fails
only the requests that caused it (engine.py: they get an "error" update and their blocks back, and are never
retried); the loop goes on and counts the failure. After UNHEALTHY_AFTER forward passes in a row have failed
(the engine, not a request, is broken: a corrupt weight store, a device gone) the server is unhealthy: /health
answers 503 until a pass succeeds. A snapshot of the engine's state (queue lengths, KV blocks, counters) is taken by
this thread after each step, so /metrics and /health never read structures the engine is changing.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field, replace

from tierlm.engine.engine import Engine
from tierlm.engine.pressure_control import PressureControl
from tierlm.engine.quota import Quota
from tierlm.engine.request import EngineRequest, RequestUpdate
from tierlm.engine.sampler import SamplingParams
from tierlm.kvcache.stats import KVStats
from tierlm.kvcache.arena import ArenaStats
from tierlm.memory.pressure import Level
from tierlm.offload.stats import TierStats
from tierlm.serve.protocol import OpenAIError

log = logging.getLogger("tierlm.serve")
SNAPSHOT_EVERY_S = 0.25
UNHEALTHY_AFTER = 3  # forward passes failed in a row


@dataclass
class Snapshot:
    running: int = 0
    waiting: int = 0
    kv: KVStats | None = None
    weight_traffic: TierStats = field(default_factory=TierStats)  # weights moved from disk / host (offload/)
    preemptions: int = 0
    step_errors: int = 0
    failed_passes_in_a_row: int = 0  # engine.counters.consecutive_failed_passes
    failed_requests: int = 0
    steps: int = 0
    host_blocks: int = 0  # cached KV blocks in the host tier
    disk_blocks: int = 0  # ... and on disk
    pressure: int = 0  # memory.pressure.Level
    pressure_fraction: float = 0.0  # of the cgroup's (or machine's) memory in use
    pressure_transitions: int = 0
    host_arena: ArenaStats | None = None  # the host KV tier's arena (None: no host tier)
    resident_layers: int = 0
    demotions: int = 0  # layers moved from memory to the stream (offload/migration.py)
    promotions: int = 0


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int, pressure: PressureControl | None = None):
        """The tenants' quotas are the engine's (Engine(quotas=...)): its scheduler admits by them, submit
        refuses by them."""
        self.engine, self.max_queue, self.pressure = engine, max_queue, pressure
        self.quotas: dict[str, Quota] = engine.scheduler.quotas
        self._inflight: dict[str, int] = {}  # tenant -> unfinished requests (any thread: under _count_lock)
        self._count_lock = threading.Lock()
        self.draining = False
        self.step_errors = 0
        self.snapshot = Snapshot()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tierlm-engine", daemon=True)
        self._last_snapshot = 0.0

    def start(self) -> None:
        """Run the loop on its own thread (tests, embedding the server). `tierlm serve` runs it on the main
        thread instead (run_forever): the thread that loaded the model keeps torch's CPU thread pool warm, and
        the same model stepped from another thread decoded at half the speed (37 vs 71 tok/s on 2 cores)."""
        self._take_snapshot()
        self._thread.start()

    def run_forever(self) -> None:
        """Run the loop in the calling thread until stop()."""
        self._take_snapshot()
        self._run()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def num_unfinished(self) -> int:
        return self.engine.num_unfinished

    def submit(self, ids: list[int], params: SamplingParams, queue: asyncio.Queue, index: int = 0,
               tenant: str = "") -> EngineRequest:
        """Queue a request whose updates go to `queue` as (index, RequestUpdate). 503 while draining or under
        critical memory pressure, 429 when the queue (or the tenant's running + queued quota) is full; bad
        input raises here (the handler turns it into a 400)."""
        if self.draining:
            raise OpenAIError(503, "the server is shutting down", "service_unavailable", code="draining",
                              headers={"Retry-After": "5"})
        if self.pressure is not None and self.pressure.level == Level.CRITICAL:
            raise OpenAIError(503, f"memory pressure is critical ({100 * self.pressure.fraction:.0f}% of the "
                              f"{self.pressure.source} limit in use); retry later", "service_unavailable",
                              code="memory_pressure", headers={"Retry-After": "2"})
        if self.engine.num_waiting >= self.max_queue:
            raise OpenAIError(429, f"too many requests queued ({self.max_queue}); retry later", "rate_limit_exceeded",
                              code="queue_full", headers={"Retry-After": "1"})
        q = self.quotas.get(tenant)
        if q is not None:
            blocks = -(-(len(ids) + params.max_tokens) // self.engine.kv.block_size)
            if q.kv_blocks is not None and blocks > q.kv_blocks:
                raise OpenAIError(400, f"the request needs {blocks} KV blocks; the tenant's quota is {q.kv_blocks}",
                                  param="max_tokens", code="quota_exceeded")
            limit = (q.running or self.engine.scheduler.max_num_seqs) + (q.queued if q.queued is not None else
                                                                         self.max_queue)
            with self._count_lock:
                if self._inflight.get(tenant, 0) >= limit:
                    raise OpenAIError(429, f"tenant {tenant!r} has {limit} requests running or queued (its quota); "
                                      "retry later", "rate_limit_exceeded", code="tenant_quota",
                                      headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()

        def sink(update: RequestUpdate) -> None:  # on the engine thread: hand over, never block
            if update.finished:
                with self._count_lock:
                    self._inflight[tenant] -= 1
            loop.call_soon_threadsafe(queue.put_nowait, (index, update))

        with self._count_lock:
            self._inflight[tenant] = self._inflight.get(tenant, 0) + 1
        try:
            req = self.engine.add_request(ids, params, sink, tenant=tenant)
        except BaseException:
            with self._count_lock:
                self._inflight[tenant] -= 1
            raise
        self._wake.set()
        return req

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def drain(self, deadline_s: float) -> None:
        """Refuse new requests and wait (blocking; call off the event loop) until the running ones finish or
        the deadline passes; what is left is aborted."""
        self.draining = True
        end = time.monotonic() + deadline_s
        while self.engine.num_unfinished and time.monotonic() < end:
            time.sleep(0.05)
        self.engine.abort_all()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished:
                self._take_snapshot()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # the step's requests got "error" updates; the server keeps serving the rest
                self.step_errors += 1
                if self.step_errors <= 10 or self.step_errors % 1000 == 0:  # a broken engine must not flood the log
                    log.exception("engine step failed (%d so far)", self.step_errors)
                self._take_snapshot()  # /health sees a failing engine at once
            if time.perf_counter() - self._last_snapshot >= SNAPSHOT_EVERY_S:
                self._take_snapshot()

    @property
    def healthy(self) -> bool:
        return self.snapshot.failed_passes_in_a_row < UNHEALTHY_AFTER

    def _take_snapshot(self) -> None:
        """State for /metrics and /health, and the memory pressure check (on the engine's thread)."""
        e, p = self.engine, self.pressure
        if p is not None:
            p.check()
        self.snapshot = Snapshot(running=len(e.scheduler.running), waiting=e.num_waiting, kv=e.kv.stats(),
                                 weight_traffic=replace(e.runner.store.stats),
                                 preemptions=e.scheduler.counters.preemptions,
                                 step_errors=self.step_errors, steps=e.scheduler.counters.steps,
                                 failed_passes_in_a_row=e.counters.consecutive_failed_passes,
                                 failed_requests=e.counters.failed_requests,
                                 host_blocks=len(e.kv.tiers.host), disk_blocks=len(e.kv.tiers.disk),
                                 pressure=int(p.level) if p else 0, pressure_fraction=p.fraction if p else 0.0,
                                 pressure_transitions=p.transitions if p else 0,
                                 host_arena=e.kv.tiers.host.stats() if e.kv.tiers.host.capacity else None,
                                 resident_layers=len(e.runner.store.resident_layers()),
                                 demotions=e.migrator.demotions if e.migrator else 0,
                                 promotions=e.migrator.promotions if e.migrator else 0)
        self._last_snapshot = time.perf_counter()
