"""The engine loop: one scheduler, one runner, one set of EOS/stop/length rules for every front end.

    add_request(prompt ids, params, sink) -> request id     (any thread)
    abort(request id)                                       (any thread)
    step() -> updates                                       (the loop's thread only)

`LLM.generate/stream/chat` drive step() from the caller's thread; `tierlm serve` runs it on one engine thread
(serve/loop.py). Requests from other threads come in through a thread-safe inbox that step() drains first,
so nothing else in the engine needs to be reentrant. A step schedules (scheduler.py), runs every group of
the step in one pass over the weights (Runner.forward_groups), samples each request with its own seeded
sampler, and emits one RequestUpdate per request that changed.

Failure: a failing request fails alone, and is never retried. An error while one request's rows are sampled
or scored is that request's: it ends with finish_reason "error" (its blocks returned at once) and the others of
the step go on. An error in the forward pass itself (a checksum error, a bug, out of memory) names no request:
a step of one request fails that request; a step of several fails none of them yet but marks them suspect,
and the scheduler then runs each suspect in a step of its own (scheduler.py), so the request that makes the
pass fail is found and failed alone while the others resume, their KV state untouched (a failed step commits
nothing: num_computed, the prefix hashes and the sampled tokens move only after a pass succeeds). Either way
step() re-raises the first error once its bookkeeping is done: the synchronous front ends surface it, the
server counts it (counters.failed_passes, consecutive_failed_passes: what /health reads). Ctrl-C (a
BaseException that is not an Exception) fails every request of the step. Nothing leaks blocks: every exit from
the running set goes through Scheduler.remove.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass, replace

import torch

from tierlm.engine.output import RequestOutput, check_request
from tierlm.engine.quota import Quota
from tierlm.engine.request import EngineRequest, RequestUpdate, Sink, Status, new_request_id
from tierlm.engine.runner import Runner
from tierlm.engine.sampler import SamplingParams
from tierlm.engine.scheduler import Scheduler
from tierlm.kvcache.paged import PagedKV
from tierlm.memory.ledger import MemoryLedger
from tierlm.offload.migration import Migrator
from tierlm.weights.tokenizer import Tokenizer


@dataclass
class EngineCounters:
    failed_passes: int = 0  # forward passes that raised
    consecutive_failed_passes: int = 0  # since the last pass that succeeded (the server's health)
    failed_requests: int = 0  # requests ended with finish_reason "error"


class Engine:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, kv: PagedKV, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 768, ledger: MemoryLedger | None = None, *,
                 migrator: Migrator | None = None, quotas: dict[str, Quota] | None = None):
        """migrator: moves layers between memory and the stream between steps (--migrate); quotas: tenant ->
        Quota for the scheduler's admissions (the server's --tenant; none: FIFO)."""
        self.runner, self.tokenizer, self.kv, self.ledger, self.migrator = runner, tokenizer, kv, ledger, migrator
        self._evictions = 0
        self.scheduler = Scheduler(kv, max_num_seqs, max_num_batched_tokens, runner.prefill_chunk, quotas)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, EngineRequest] = {}  # unfinished, owned by the loop's thread
        self.counters = EngineCounters()

    # --- any thread ------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, sink: Sink | None = None,
                    request_id: str | None = None, out: RequestOutput | None = None, tenant: str = "",
                    keep_logits: bool = False) -> EngineRequest:
        """Queue a request (checked now: bad input raises here, in the caller's thread). Its updates go to
        `sink` from the loop's thread; `out` is filled as it runs. keep_logits: the request keeps the raw logits
        of every row computed for it in req.logits (LLM.prompt_logits; with prompt_logprobs, every prompt row)."""
        max_new = check_request(self.runner.config, self.runner.max_context, self.kv, prompt_ids, params)
        out = out if out is not None else RequestOutput()
        out.prompt_token_ids = list(prompt_ids)
        out.metrics.prompt_tokens = len(prompt_ids)
        out.prompt_logprobs = [None] if params.prompt_logprobs is not None else None
        req = EngineRequest(request_id or new_request_id(), list(prompt_ids), params, max_new, out, self.tokenizer,
                            sink, tenant, keep_logits)
        self._inbox.put(("add", req))
        return req

    def abort(self, request_id: str) -> None:
        """Stop a request (a client went away): its blocks are freed at the next step, its sink gets a final
        update with finish_reason "abort". Unknown or finished ids are ignored."""
        self._inbox.put(("abort", request_id))

    def abort_all(self) -> None:
        self._inbox.put(("abort_all", None))

    @property
    def num_waiting(self) -> int:
        """Requests queued and not yet running (readable from any thread: lengths only)."""
        return len(self.scheduler.waiting) + self._inbox.qsize()

    @property
    def num_unfinished(self) -> int:
        return len(self._requests) + self._inbox.qsize()

    # --- the loop's thread -----------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return self.num_unfinished > 0

    def _drain_inbox(self) -> list[RequestUpdate]:
        updates = []
        while True:
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return updates
            if op == "add":
                arg.stats_at_arrival = replace(self.runner.store.stats)
                self._requests[arg.id] = arg
                self.scheduler.add(arg)
            elif op == "abort_all":
                updates.extend(self._finish(r, "abort") for r in list(self._requests.values()))
            elif (req := self._requests.get(arg)) is not None:
                updates.append(self._finish(req, "abort"))

    def _finish(self, req: EngineRequest, reason: str, error: str | None = None, text: str = "",
                tokens: tuple[int, ...] = (), logprobs: tuple = ()) -> RequestUpdate:
        """The request's last update (with what this step added to it): its blocks are returned first."""
        self.scheduler.remove(req)
        self._requests.pop(req.id, None)
        self.counters.failed_requests += reason == "error"
        tail = req.finish(reason, self.runner.store.stats)
        update = RequestUpdate(req.id, text + tail, tokens, True, reason, logprobs, error)
        req.emit(update)
        return update

    def step(self) -> list[RequestUpdate]:
        """One scheduled forward pass and its samples; [] when there is nothing to do."""
        updates = self._drain_inbox()
        if self.migrator is not None:
            self.migrator.tick(self.scheduler)  # between passes: no layer is acquired now
        sched = self.scheduler.schedule()
        if sched.empty:
            if self.scheduler.waiting and not self.scheduler.running:
                # Nothing runs and the head of the queue cannot be placed: check_request makes every request
                # fit an empty pool, so this is a bug. Fail the request rather than spin forever.
                head = self.scheduler.waiting[0]
                updates.append(self._finish(head, "error", "the scheduler could not place this request"))
            return updates
        groups, owners, starts = [], [], []
        failed: dict[EngineRequest, BaseException] = {}  # requests whose own rows raised (scoring, sampling)

        def scorer_of(r: EngineRequest, start: int):
            def score(row: int, lg: torch.Tensor) -> None:
                if r not in failed:
                    try:
                        r.score(start + row, lg[0])
                    except Exception as e:  # this request's rows only: the pass goes on for the others
                        failed[r] = e
            return score

        if sched.decodes:
            seqs = [r.seq for r in sched.decodes]
            tokens = torch.tensor([[s.tokens[-1]] for s in seqs])  # [B, 1]
            groups.append((tokens, self.kv.step(seqs, 1), "last", None))
            owners.append(sched.decodes)
            starts.append(None)
        for c in sched.prefills:
            start = c.req.seq.num_computed
            tokens = torch.tensor([c.req.seq.tokens[start:start + c.tokens]])  # [1, T]
            # a chunk scored for prompt_logprobs hands every position's logits to its request (a slice of rows at
            # a time) and returns the last one's; the last chunk of any other request returns the last
            # position's, to sample from (max_tokens=0 comes only with prompt_logprobs: check_request)
            mode = "all" if c.req.scoring else "last" if c.last else "none"
            groups.append((tokens, self.kv.step([c.req.seq], c.tokens), mode,
                           scorer_of(c.req, start) if mode == "all" else None))
            owners.append([c.req])
            starts.append(start)
        reqs_of_step = [r for reqs in owners for r in reqs]
        marks = [r.mark() for r in reqs_of_step]
        t0 = time.perf_counter()
        try:
            logits = self.runner.forward_groups(groups)
        except Exception as e:
            updates.extend(self._failed_pass(reqs_of_step, marks, e))
            raise
        except BaseException as e:  # Ctrl-C: the step's requests end
            updates.extend(self._finish(r, "error", _message(e)) for r in reqs_of_step)
            raise
        self.counters.consecutive_failed_passes = 0
        for r in reqs_of_step:
            r.suspect = False
        for _, step, _, _ in groups:
            step.finish()
        if self.ledger is not None and self.ledger.tracing:
            self._trace_kv()
        elapsed = time.perf_counter() - t0
        for c in sched.prefills:  # measured prefill cost per token: what restoring a block from a tier is weighed against
            self.kv.note_prefill(c.tokens, elapsed * c.tokens / sched.num_tokens)
        now = time.perf_counter()
        for (_, step, mode, _), reqs, lg, start in zip(groups, owners, logits, starts):
            done = start is not None and start + step.t == reqs[0].prefill_end  # a chunk that ends its prefill
            for i, r in enumerate(reqs):
                if r.status is not Status.RUNNING or r in failed:
                    continue
                try:
                    if done and not r.max_new:  # max_tokens=0: the prompt is scored, nothing is generated
                        r.out.metrics.ttft_s = now - r.arrival
                        updates.append(self._finish(r, "length"))
                    elif mode != "none" and (start is None or done):
                        updates.append(self._accept(r, lg[i:i + 1], now, keep=mode != "all"))
                except Exception as e:
                    failed[r] = e
        for r, e in failed.items():
            if r.status is Status.RUNNING:
                updates.append(self._finish(r, "error", _message(e)))
        if failed:
            raise next(iter(failed.values()))
        return updates

    def _failed_pass(self, reqs: list[EngineRequest], marks: list, error: Exception) -> list[RequestUpdate]:
        """The forward pass raised: a lone request (a suspect runs alone) is the cause and fails; several are
        rolled back to before the step and marked suspect, for the scheduler to run one at a time."""
        self.counters.failed_passes += 1
        self.counters.consecutive_failed_passes += 1
        if len(reqs) == 1:
            return [self._finish(reqs[0], "error", _message(error))]
        for r, mark in zip(reqs, marks):
            r.restore(mark)
            r.suspect = True
        return []

    def _trace_kv(self) -> None:
        """The timeline's view of the KV pool: blocks in use (of its reservation), and evictions this step."""
        man, tier = self.kv.manager, "cuda" if self.kv.device.type == "cuda" else "cpu"
        self.ledger.note("usage", "kv_used", tier, (man.num_blocks - man.num_free) * self.kv.pool.block_bytes)
        if (n := man.counters.evictions - self._evictions) > 0:
            self.ledger.note("evict", "kv_pool", tier, n * self.kv.pool.block_bytes)
        self._evictions = man.counters.evictions

    def _accept(self, r: EngineRequest, logits: torch.Tensor, now: float, keep: bool = True) -> RequestUpdate:
        """Sample r's next token from logits [1, V] and apply the rules: EOS (not part of the output), a stop
        string, the length limit. Emits and returns r's update. keep: the row is kept for keep_logits (False:
        score() kept it with its chunk)."""
        m, p = r.out.metrics, r.params
        if r.keep_logits and keep:
            r.logits.append(logits.float())
        if not r.out.token_ids and not m.ttft_s:
            m.ttft_s = now - r.arrival
        elif r.last_token_at:
            m.decode_s += now - r.last_token_at
            m.decode_tokens += 1
        r.last_token_at = now
        token, logprob = r.sample(logits)
        if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            return self._finish(r, "stop")
        r.out.token_ids.append(token)
        r.seq.tokens.append(token)
        if logprob is not None:
            r.out.logprobs.append(logprob)
        delta = r.detok.add(token)
        logprobs = (logprob,) if logprob is not None else ()
        if r.detok.stopped or len(r.out.token_ids) >= r.max_new:
            return self._finish(r, "stop" if r.detok.stopped else "length", None, delta, (token,), logprobs)
        update = RequestUpdate(r.id, delta, (token,), logprobs=logprobs)
        r.emit(update)
        return update

    def cancel(self, request_ids: list[str]) -> None:
        """abort() done now, from the loop's thread: the requests' blocks are back before this returns."""
        self._drain_inbox()
        for rid in request_ids:
            if (req := self._requests.get(rid)) is not None:
                self._finish(req, "abort")

    def run(self) -> None:
        """Step until every request is finished (the synchronous front ends)."""
        while self.has_unfinished:
            self.step()


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
