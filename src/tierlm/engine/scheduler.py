"""The scheduler: which requests run in the next step, and with how many tokens each (vLLM v1's shape).

    each step, within a token budget (max_num_batched_tokens):
      1. running decodes first, one token each: a long prompt never freezes the streams already running.
         When the pool cannot give every one of them its next slot, the most recently admitted running
         request is preempted (its blocks freed, full ones stay cached) and re-queued first; on re-admission
         it recomputes prompt + output (the prefix cache usually serves most of it).
      2. the next prefill chunk of each running request still prefilling, in admission order;
      3. waiting requests in arrival order while the budget, max_num_seqs and the pool allow: admission is a
         side-effect-free probe (PagedKV.can_admit) and then a commit (admit + reserve), so a request that
         does not fit changes nothing, not even the prefix-hit counters.
    A running request marked suspect (it was in a forward pass that failed beside others: engine.py) runs in a
    step of its own, before anything else, until one of its steps succeeds or it fails alone.
    Chunks are aligned where the request's computing started (EngineRequest.next_chunk) and only whole
    chunks are scheduled, so every row goes through the same kernels as it would alone: outputs do not
    depend on what else runs.

The scheduler reserves every KV block a step needs before the step; the runner receives an immutable step
(positions, slots, block tables) and allocates nothing. Invariants: a request is in exactly one of
waiting, running (or finished, owned by nobody here); a running request holds blocks for everything
scheduled; the budget is never exceeded (the constructor checks it holds one chunk + every decode).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tierlm.engine.quota import Quota
from tierlm.engine.request import EngineRequest, Status
from tierlm.errors import UsageError
from tierlm.kvcache.paged import PagedKV


@dataclass
class SchedulerCounters:
    steps: int = 0
    decode_rows: int = 0  # sum of decode batch sizes
    prefill_tokens: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0  # tokens prefilled again after a preemption (prefix-cache hits excluded)
    max_running: int = 0
    decode_steps: int = 0  # steps with at least one decode
    mixed_steps: int = 0  # steps with decodes and prefill chunks together
    waste_sum: float = 0.0  # KV slot waste (PagedKV.waste) before each decode step, summed

    @property
    def mean_waste(self) -> float:
        return self.waste_sum / self.decode_steps if self.decode_steps else 0.0


@dataclass(frozen=True)
class Chunk:
    req: EngineRequest
    tokens: int  # new tokens this step
    last: bool  # the chunk completes the prefill (the next token is sampled from it, unless max_tokens=0)


@dataclass(frozen=True)
class SchedulerOutput:
    decodes: list[EngineRequest] = field(default_factory=list)
    prefills: list[Chunk] = field(default_factory=list)
    preempted: list[EngineRequest] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.tokens for c in self.prefills)


class Scheduler:
    def __init__(self, kv: PagedKV, max_num_seqs: int, max_num_batched_tokens: int, prefill_chunk: int,
                 quotas: dict[str, Quota] | None = None):
        if max_num_batched_tokens < prefill_chunk + max_num_seqs:
            raise UsageError(f"max_num_batched_tokens ({max_num_batched_tokens}) must hold one prefill chunk "
                             f"({prefill_chunk}) and a decode for each of max_num_seqs ({max_num_seqs})")
        self.kv, self.max_num_seqs, self.budget, self.chunk = kv, max_num_seqs, max_num_batched_tokens, prefill_chunk
        self.quotas: dict[str, Quota] = quotas or {}  # tenant -> quota (engine/quota.py); empty: FIFO admission
        # No admissions (critical memory pressure): running requests go on, new ones wait. Set through
        # pause_admissions by the PressureControl, which is built after (and over) the engine, so it cannot be
        # handed to this constructor.
        self._paused = False
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []  # admission order: the last is preempted first
        # blocks the request next in line lacked at the last schedule() (0: admission did not stop on KV);
        # what offload/migration.py reads as KV demand
        self.kv_short = 0
        self.counters = SchedulerCounters()

    @property
    def paused(self) -> bool:
        """Admissions paused (pause_admissions)."""
        return self._paused

    def pause_admissions(self, paused: bool) -> None:
        """Stop (True) or resume (False) admitting waiting requests; running ones are not touched."""
        self._paused = paused

    def add(self, req: EngineRequest) -> None:
        self.waiting.append(req)

    def remove(self, req: EngineRequest) -> None:
        """Take a request out (finished, aborted or failed) and return its blocks at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        kv, out = self.kv, SchedulerOutput()
        if (suspect := next((r for r in self.running if r.suspect), None)) is not None:
            return self._count(self._alone(suspect, out))
        budget = self.budget
        # 1. decodes, preempting the newest running request while the pool is short
        while True:
            decodes = [r for r in self.running if not r.prefilling]
            if sum(kv.blocks_needed(r.seq, 1) for r in decodes) <= kv.manager.num_free:
                break
            self._preempt(self.running[-1], out)
        if decodes:
            self.counters.decode_steps += 1
            self.counters.waste_sum += kv.waste()
        for r in decodes:
            kv.reserve(r.seq, 1)
        out.decodes.extend(decodes)
        budget -= len(decodes)
        # 2. prefills in flight (their blocks were reserved at admission)
        for r in self.running:
            if r.prefilling and (n := r.next_chunk(self.chunk)) <= budget:
                out.prefills.append(Chunk(r, n, r.seq.num_computed + n == r.prefill_end))
                budget -= n
        # 3. admissions
        self.kv_short = 0
        while self.waiting and len(self.running) < self.max_num_seqs and not self._paused:
            r = self._next_admissible()
            if r is None:
                break  # every waiting request's tenant is at its quota
            # a request scoring its prompt computes every position (no prefix hit); one generating nothing
            # (max_tokens=0) needs no slot for a first decode
            use_cache, extra = not r.scoring, int(r.max_new > 0)
            if not kv.can_admit(r.seq.tokens, extra, use_cache):
                self.kv_short = max(1, -(-(len(r.seq.tokens) + extra) // kv.block_size) - kv.manager.num_free)
                break  # it waits: later, smaller requests must not starve it
            if r.next_chunk(self.chunk) > budget:
                break
            self.waiting.remove(r)
            kv.admit(r.seq, use_cache)  # takes cached prefix blocks (restores from the KV tiers), sets num_computed
            kv.reserve(r.seq, len(r.seq.tokens) - r.seq.num_computed + extra)  # the prompt + its first decode
            if not r.out.token_ids:
                r.out.cached_tokens = r.seq.num_computed  # prompt tokens served by the prefix cache
            else:  # re-admitted after a preemption
                todo = r.prefill_end - r.seq.num_computed
                self.counters.recomputed_tokens += todo
                kv.recomputed_tokens += todo
            r.status = Status.RUNNING
            self.running.append(r)
            n = r.next_chunk(self.chunk)
            out.prefills.append(Chunk(r, n, r.seq.num_computed + n == r.prefill_end))
            budget -= n
        return self._count(out)

    def _alone(self, r: EngineRequest, out: SchedulerOutput) -> SchedulerOutput:
        """A step of r alone (a suspect of a failed pass: engine.py). Its blocks for the step are still reserved
        from the step that failed (a failed step commits nothing), so it needs none now."""
        if r.prefilling:
            n = r.next_chunk(self.chunk)
            out.prefills.append(Chunk(r, n, r.seq.num_computed + n == r.prefill_end))
        else:
            self.kv.reserve(r.seq, 1)
            out.decodes.append(r)
        return out

    def _count(self, out: SchedulerOutput) -> SchedulerOutput:
        c = self.counters
        c.steps += not out.empty
        c.mixed_steps += bool(out.decodes and out.prefills)
        c.decode_rows += len(out.decodes)
        c.prefill_tokens += sum(ch.tokens for ch in out.prefills)
        c.max_running = max(c.max_running, len(self.running))
        return out

    def _next_admissible(self) -> EngineRequest | None:
        """The waiting request to admit next: without quotas, the oldest (FIFO); with tenants, the oldest of
        the tenant running the fewest, among tenants under their running and KV-block quotas."""
        if not self.quotas:
            return self.waiting[0]
        running: dict[str, int] = {}
        blocks: dict[str, int] = {}
        for r in self.running:
            running[r.tenant] = running.get(r.tenant, 0) + 1
            blocks[r.tenant] = blocks.get(r.tenant, 0) + len(r.seq.held)
        best = None
        for r in self.waiting:
            q = self.quotas.get(r.tenant)
            n = running.get(r.tenant, 0)
            if q is not None and q.running is not None and n >= q.running:
                continue
            need = -(-(len(r.seq.tokens) + 1) // self.kv.block_size)
            if q is not None and q.kv_blocks is not None and blocks.get(r.tenant, 0) + need > q.kv_blocks:
                continue
            if best is None or n < running.get(best.tenant, 0):
                best = r
        return best

    def preempt_newest(self) -> EngineRequest | None:
        """Give back the most recently admitted request's blocks now (memory pressure); it waits, first in line."""
        if not self.running:
            return None
        victim = self.running[-1]
        self._preempt(victim, SchedulerOutput())
        return victim

    def _preempt(self, victim: EngineRequest, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.kv.free(victim.seq)
        victim.preempted()
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        self.counters.preemptions += 1
        self.kv.preemptions += 1
