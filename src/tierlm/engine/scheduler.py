"""Batched generation over the paged KV cache: admit, prefill, decode together, preempt when blocks run out.

    loop:
      admit waiting requests in order while their blocks fit (a prefix-cache hit takes cached blocks and
        skips their prefill); prefill each admitted prompt alone, in the runner's chunks; sample its first token
      decode every running sequence as one batch [B, 1]; sample each row with its own request's sampler
      before a decode step, every running sequence must have room for one more token: when the pool is
        short, the most recently admitted sequence is preempted (its blocks freed, full ones stay cached)
        and re-queued first; on re-admission it recomputes prompt + generated tokens (the prefix cache
        usually serves most of it). Nothing is lost or emitted twice: generated tokens live in the request.

Invariants: a request is in exactly one of waiting, running, finished; a running sequence's blocks hold
exactly its num_computed tokens; outputs come back in input order.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from tierlm.engine.generation import RequestOutput, check_request, find_stop
from tierlm.engine.runner import Runner
from tierlm.engine.sampler import Sampler, SamplingParams
from tierlm.errors import KVCacheFullError
from tierlm.kvcache.paged import PagedKV, Sequence
from tierlm.weights.tokenizer import Tokenizer


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    out: RequestOutput
    max_new: int
    sampler: Sampler = field(init=False)
    seq: Sequence = field(init=False)
    done: bool = False
    stopped_by_string: bool = False

    def __post_init__(self):
        self.sampler = Sampler(self.params)
        self.seq = Sequence(tokens=list(self.prompt_ids))


@dataclass
class SchedulerCounters:
    steps: int = 0  # decode steps
    batch_rows: int = 0  # sum of batch sizes over decode steps
    preemptions: int = 0
    recomputed_tokens: int = 0  # tokens prefilled again after a preemption (prefix-cache hits excluded)
    waste_sum: float = 0.0  # slot waste (KVStats.waste) before each decode step, summed
    decode_s: float = 0.0  # wall time of the batched decode steps (forward + sampling)
    max_running: int = 0  # most sequences decoded together

    @property
    def mean_waste(self) -> float:
        return self.waste_sum / self.steps if self.steps else 0.0


class Scheduler:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, kv: PagedKV, max_batch: int = 64):
        self.runner, self.tokenizer, self.kv, self.max_batch = runner, tokenizer, kv, max_batch
        self.counters = SchedulerCounters()

    def run(self, requests: list[Request]) -> None:
        """Requests come from make_requests: each fits the whole pool alone, so the queue always drains."""
        waiting: deque[Request] = deque(requests)
        running: list[Request] = []
        t0 = time.perf_counter()
        while waiting or running:
            while waiting and len(running) < self.max_batch and self._admit(waiting[0], t0):
                r = waiting.popleft()
                if not r.done:
                    running.append(r)
            running = [r for r in running if not r.done]
            if not running:
                if waiting:  # nothing runs and the head of the queue does not fit: cannot happen after the check above
                    raise KVCacheFullError("the KV pool cannot hold the next request")
                break
            while sum(self.kv.blocks_needed(r.seq, 1) for r in running) > self.kv.manager.num_free:
                victim = running.pop()  # the most recently admitted
                self.kv.free(victim.seq)
                waiting.appendleft(victim)
                self.counters.preemptions += 1
                self.kv.preemptions += 1
            if not running:
                continue
            self.counters.waste_sum += self.kv.waste()
            ts = time.perf_counter()
            tokens = torch.tensor([[r.seq.tokens[-1]] for r in running])  # [B, 1]
            logits = self.runner.forward(tokens, self.kv.batch([r.seq for r in running]))  # [B, V]
            c = self.counters
            c.steps, c.batch_rows, c.max_running = c.steps + 1, c.batch_rows + len(running), max(c.max_running, len(running))
            for i, r in enumerate(running):
                self._accept(r, int(r.sampler(logits[i:i + 1])[0]))
                if r.done:
                    self.kv.free(r.seq)
            elapsed = time.perf_counter() - ts
            c.decode_s += elapsed
            for r in running:  # each request waited for the whole step
                r.out.metrics.decode_s += elapsed
                r.out.metrics.decode_tokens += 1
            running = [r for r in running if not r.done]
        for r in requests:
            if not r.stopped_by_string:  # a stop string already cut the text
                r.out.text = self.tokenizer.decode(r.out.token_ids)

    def _admit(self, r: Request, t0: float) -> bool:
        """Prefill r if its blocks fit now (taking cached prefix blocks first); False leaves it waiting."""
        kv = self.kv
        kv.admit(r.seq)
        todo = len(r.seq.tokens) - r.seq.num_computed
        if kv.blocks_needed(r.seq, todo + 1) > kv.manager.num_free:  # +1: room for its first decode step
            kv.free(r.seq)
            return False
        if r.out.token_ids:  # re-admitted after preemption
            self.counters.recomputed_tokens += todo
            kv.recomputed_tokens += todo
        tp = time.perf_counter()
        logits = self.runner.forward(torch.tensor([r.seq.tokens[r.seq.num_computed:]]), kv.batch([r.seq]))
        kv.note_prefill(todo, time.perf_counter() - tp)
        first = not r.out.token_ids
        self._accept(r, int(r.sampler(logits)[0]))
        if first:
            r.out.metrics.ttft_s = time.perf_counter() - t0
        if r.done:
            kv.free(r.seq)
        return True

    def _accept(self, r: Request, token: int) -> None:
        """Record a sampled token; mark the request done on EOS, a stop string or its length limit."""
        out, p = r.out, r.params
        if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            out.finish_reason, r.done = "stop", True
            return
        out.token_ids.append(token)
        r.seq.tokens.append(token)
        if p.stop:
            text = self.tokenizer.decode(out.token_ids)
            if (cut := find_stop(text, p.stop)) >= 0:
                out.text, out.finish_reason, r.done, r.stopped_by_string = text[:cut], "stop", True, True
                return
        if len(out.token_ids) >= r.max_new:
            out.finish_reason, r.done = "length", True


def make_requests(prompts: list[list[int]], params: SamplingParams, runner: Runner, kv: PagedKV) -> list[Request]:
    """Requests for a batch, each checked as a single request is (check_request)."""
    reqs = []
    for ids in prompts:
        max_new = check_request(runner.config, runner.max_context, kv, ids, params)
        out = RequestOutput(prompt_token_ids=list(ids))
        out.metrics.prompt_tokens = len(ids)
        reqs.append(Request(list(ids), params, out, max_new))
    return reqs
