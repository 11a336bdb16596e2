"""`tierlm bench`: prefill a synthetic prompt, decode N tokens, report measured vs the planner's prediction.

Token ids are fixed (no tokenizer, EOS ignored) so any model, real or synthetic, runs the same work: one
request through the engine, as generate and serve run it. The first `warmup` decode steps are not counted:
they include the ring filling for the first time.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from tierlm.config import format_size
from tierlm.engine.llm import LLM
from tierlm.engine.sampler import SamplingParams
from tierlm.errors import ContextLengthError
from tierlm.offload.stats import TierStats, describe_stats
from tierlm.offload.tier import Tier


def prompt_ids(vocab_size: int, n: int) -> torch.Tensor:
    """The fixed benchmark prompt: ids 1..n (wrapping below vocab_size) -> [1, n]."""
    return torch.arange(n).remainder(vocab_size - 1).add(1).unsqueeze(0)


def measure_decode(llm: LLM, prompt_tokens: int, tokens: int, warmup: int,
                   before_step: Callable[[], None] | None = None) -> tuple[float, list[float], TierStats]:
    """(prefill seconds, seconds of each counted decode step, tier traffic of the counted steps) of one greedy
    request through the engine (EOS ignored: it runs every token; same ids every run). Prefill is the request's
    TTFT; each decode step is one engine step, timed alone. `before_step` runs untimed before each decode
    step (benchmarks evict the page cache there)."""
    if prompt_tokens + tokens + warmup >= llm.max_context:  # + the last token sampled (never fed back)
        raise ContextLengthError(f"{prompt_tokens} + {tokens + warmup} tokens exceed max_context {llm.max_context}")
    ids = prompt_ids(llm.config.vocab_size, prompt_tokens)[0].tolist()
    # the first token comes with the prefill; then warmup + tokens decode steps, one token each
    params = SamplingParams(temperature=0.0, max_tokens=warmup + tokens + 1, ignore_eos=True)
    engine = llm.engine
    req = engine.add_request(ids, params)
    steps, before = [], replace(llm.store.stats)
    try:
        while not req.out.token_ids and req.out.finish_reason == "":
            engine.step()  # the prefill (in chunks) and its first token
        for k in range(warmup + tokens):
            if k == warmup:
                before = replace(llm.store.stats)
            if before_step is not None:
                before_step()
            t = time.perf_counter()
            engine.step()
            if k >= warmup:
                steps.append(time.perf_counter() - t)
    finally:
        engine.cancel([req.id])  # finished by now, unless a step failed
    return req.out.metrics.ttft_s, steps, llm.store.stats - before


def run_bench(llm: LLM, prompt_tokens: int, tokens: int, warmup: int, profile_note: str) -> str:
    prefill, steps, moved = measure_decode(llm, prompt_tokens, tokens, warmup)
    med = sorted(steps)[len(steps) // 2]
    lines = [f"prefill {prompt_tokens} tokens: {prefill * 1e3:.0f} ms; decode {tokens} tokens "
             f"(after {warmup} warm-up): median {med * 1e3:.1f} ms/token ({1 / med:.2f} tok/s)"]
    p = llm.plan
    if p is not None:
        disk = p.count(Tier.DISK)
        lines.append(f"plan: {len(p.layer_tiers) - disk} layers resident, {disk} on disk, head {p.head_tier.value}, "
                     f"ring {p.ring_depth}; {format_size(p.disk_bytes_per_token)}/token from disk")
        lines.append(f"predicted {p.token_s * 1e3:.1f} ms/token; measured/predicted = {med / p.token_s:.2f} "
                     f"(profile: {profile_note})")
    calibrated = llm.profile.disk_read_gbps if llm.profile_calibrated else None
    lines.append(describe_stats(moved, moved.forward_passes, calibrated))
    return "\n".join(lines)
