"""A request inside the engine loop, and the updates it emits.

Lifecycle: WAITING (queued; after a preemption too) -> RUNNING (holds KV blocks; prefilling in chunks, then
decoding) -> FINISHED (stop, length, abort or error; its blocks are returned). Updates go to the request's
sink from the loop's thread; a sink must not block (the server's hands them to its event loop).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

from tierlm.engine.detok import IncrementalDetokenizer
from tierlm.engine.output import RequestOutput
from tierlm.engine.sampler import Sampler, SamplingParams
from tierlm.kvcache.sequence import KVSequence
from tierlm.offload.stats import TierStats
from tierlm.weights.tokenizer import Tokenizer

_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely (token id, logprob), most likely first
    rank: int | None = None  # 1 + how many tokens are more likely (prompt_logprobs: vLLM reports it)


@dataclass(frozen=True)
class RequestUpdate:
    """What one step added to one request: text that may be shown now, the tokens behind it, and whether the
    request is over (then finish_reason is "stop" | "length" | "abort" | "error")."""
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None


Sink = Callable[[RequestUpdate], None]


@dataclass(eq=False)
class EngineRequest:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int  # tokens it may generate (max_tokens, cut to the context)
    out: RequestOutput
    tokenizer: Tokenizer
    sink: Sink | None = None
    tenant: str = ""  # whose quota it counts against (engine/quota.py); "" = no tenant
    keep_logits: bool = False  # LLM.prompt_logits (and tests): keep the raw logits of every row computed for it
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    prefill_end: int = 0  # tokens of seq.tokens to compute before sampling (the prompt, + output after a preemption)
    sampler: Sampler = field(init=False)
    seq: KVSequence = field(init=False)
    detok: IncrementalDetokenizer = field(init=False)
    stats_at_arrival: TierStats | None = None
    last_token_at: float = 0.0
    scored: int = 0  # prompt positions whose logits were scored (prompt_logprobs)
    logits: list[torch.Tensor] = field(default_factory=list)  # keep_logits: [n, V] fp32 pieces, position order
    # in a forward pass that failed beside others: it runs in steps of its own until one succeeds (engine.py)
    suspect: bool = False

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)
        self.seq = KVSequence(tokens=list(self.prompt_ids))
        self.detok = IncrementalDetokenizer(self.tokenizer, self.params.stop)
        self.prefill_end = len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.seq.num_computed < self.prefill_end

    def next_chunk(self, chunk: int) -> int:
        """Tokens of the next prefill chunk: chunks are aligned from where computing started, whatever the step
        they land in, so every row goes through the same kernels as in a run alone."""
        return min(chunk, self.prefill_end - self.seq.num_computed)

    @property
    def scoring(self) -> bool:
        """Its prompt logprobs are not all computed yet: each prefill chunk returns every position's logits,
        and it takes no prefix-cache hit at admission (every prompt position must be computed)."""
        return self.params.prompt_logprobs is not None and self.scored < len(self.prompt_ids)

    def score(self, start: int, logits: torch.Tensor) -> None:
        """logits [n, V] of prompt positions start..start+n-1 (a slice of a prefill chunk, Runner.score_rows rows):
        row i gives the logprob of prompt token start+i+1 (fp32 log_softmax of this slice only: no [prompt, V]
        tensor is ever held)."""
        assert start == self.scored, "prompt positions are scored in order"
        k, end = self.params.prompt_logprobs, start + logits.shape[0]
        if self.keep_logits:
            self.logits.append(logits.float())
        targets = self.prompt_ids[start + 1:end + 1]  # the chunk's last row predicts nothing in the prompt when end = P
        if targets:
            lp = torch.log_softmax(logits[:len(targets)].float(), dim=-1)  # [n, V]
            chosen = lp.gather(-1, torch.tensor(targets, device=lp.device)[:, None])  # [n, 1]
            ranks = ((lp > chosen).sum(-1) + 1).tolist()  # [n]
            top = torch.topk(lp, k) if k else None
            for i, (token, value, rank) in enumerate(zip(targets, chosen[:, 0].tolist(), ranks)):
                pairs = tuple(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else ()
                self.out.prompt_logprobs.append(TokenLogprob(token, value, pairs, rank))
        self.scored = end

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """logits [1, V] -> the next token (and its logprob when asked), with this request's penalties and
        seeded sampler."""
        p = self.params
        logits = self.sampler.penalise(logits, self.out.token_ids)
        if len(self.out.token_ids) < p.min_tokens:
            logits = logits.clone()
            logits[:, list(self.tokenizer.eos_token_ids)] = float("-inf")
        token = int(self.sampler(logits)[0])
        if p.logprobs is None:
            return token, None
        lp = torch.log_softmax(logits.float(), dim=-1)[0]  # [V]
        top = torch.topk(lp, p.logprobs) if p.logprobs else None
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        return token, TokenLogprob(token, float(lp[token]), pairs)

    def mark(self) -> tuple[int, int, int]:
        """What a step may change before its pass is known to succeed: the prompt positions scored (a scorer runs
        inside the pass). restore(mark) undoes a failed pass's share."""
        return self.scored, len(self.out.prompt_logprobs or ()), len(self.logits)

    def restore(self, mark: tuple[int, int, int]) -> None:
        self.scored = mark[0]
        if self.out.prompt_logprobs is not None:
            del self.out.prompt_logprobs[mark[1]:]
        del self.logits[mark[2]:]

    def emit(self, update: RequestUpdate) -> None:
        if self.sink is not None:
            self.sink(update)

    def preempted(self) -> None:
        """Its blocks were taken back: everything it knows is recomputed on re-admission (prompt + output)."""
        self.status = Status.WAITING
        self.prefill_end = len(self.seq.tokens)
        if self.scoring:  # preempted mid-prompt: its prompt is scored again from the start
            self.scored, self.out.prompt_logprobs = 0, [None]
            self.logits.clear()

    def finish(self, reason: str, stats: TierStats | None = None) -> str:
        """Mark it finished and fill its output; returns the text held back until now (to be streamed last).
        The weight traffic (offload/stats.TierStats) is everything moved while it ran (shared with the requests
        running beside it)."""
        self.status = Status.FINISHED
        self.out.finish_reason = reason
        tail = self.detok.flush()
        self.out.text = self.detok.text
        if stats is not None and self.stats_at_arrival is not None:
            self.out.metrics.tiers = stats - self.stats_at_arrival
        return tail
