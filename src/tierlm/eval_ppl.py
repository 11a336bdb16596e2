"""Perplexity over a text with a sliding window (HF's "perplexity of fixed-length models" recipe).

The KV cache is stored as the LLM's kv_dtype (so int8 KV is scored too). Windows of `window` tokens advance by `stride`; each window is one fresh forward pass (its own KV cache) and
scores only the tokens the previous window did not, each with at least window - stride tokens of context
(except at the start). PPL = exp(mean NLL over all scored tokens). The first token of the text is never
scored (nothing predicts it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierlm.errors import UsageError
from tierlm.progress import progress_bar


@dataclass(frozen=True)
class PplResult:
    label: str  # e.g. "int4-g32"
    ppl: float
    tokens: int  # tokens scored
    seconds: float
    weight_bytes: int  # resident weight bytes of the run


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of every window over n_tokens tokens (pure)."""
    if not 0 < stride <= window:
        raise UsageError(f"need 0 < stride <= window, got stride {stride}, window {window}")
    out, scored_to = [], 1  # position 0 has no prediction
    begin = 0
    while scored_to < n_tokens:
        end = min(begin + window, n_tokens)
        out.append((begin, end, scored_to))
        scored_to = end
        begin = max(0, end - (window - stride))
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def perplexity(llm, ids: list[int], window: int, stride: int, label: str, progress: bool | None = None) -> PplResult:
    """Sliding-window perplexity of token ids `ids` under `llm` (an LLM)."""
    runner = llm.runner
    if window > runner.max_context:
        raise UsageError(f"window {window} exceeds the context served ({runner.max_context})")
    plan = windows(len(ids), window, stride)
    nll, count = 0.0, 0
    bar = progress_bar(len(plan), f"perplexity {label}", progress, unit="window")
    t0 = time.perf_counter()
    for begin, end, first in plan:
        kv = runner.new_kv(end - begin, storage=llm.kv.pool.storage)  # the LLM's KV format (kv_dtype)
        try:
            logits = runner.forward(torch.tensor([ids[begin:end]]), kv, all_logits=True)[0]  # [T, V] fp32
        finally:
            kv.release()
        # logits at position p predict token p + 1: score targets first..end-1
        pred = logits[first - 1 - begin:end - 1 - begin]  # [S, V]
        target = torch.tensor(ids[first:end])  # [S]
        nll += float(F.cross_entropy(pred.float(), target, reduction="sum"))
        count += len(target)
        bar.update()
    bar.close()
    weights = sum(llm.store.nbytes_by_tier().values())
    return PplResult(label, math.exp(nll / count), count, time.perf_counter() - t0, weights)


def describe(results: list[PplResult]) -> str:
    """A table: one row per scheme, with the change against the first row (the reference)."""
    ref = results[0].ppl
    lines = [f"{'weights':<16} {'ppl':>9} {'vs ' + results[0].label:>12} {'tokens':>7} {'weight MiB':>11} {'s':>7}"]
    for r in results:
        lines.append(f"{r.label:<16} {r.ppl:9.3f} {100 * (r.ppl / ref - 1):+11.2f}% {r.tokens:7d} "
                     f"{r.weight_bytes / 2**20:11.1f} {r.seconds:7.1f}")
    return "\n".join(lines)
