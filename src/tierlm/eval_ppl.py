"""Perplexity over a text, in one of two schemes:

  sliding    HF's "perplexity of fixed-length models" recipe (windows of `window` tokens advancing by `stride`)
  llama.cpp  exactly as `llama-perplexity -c N` scores (tools/perplexity/perplexity.cpp): the text's tokens
             (BOS first when the vocabulary adds one) cut into floor(n / N) non-overlapping chunks of N; each
             chunk's first token replaced by BOS when the vocabulary adds one; the second half of each chunk
             scored (tokens N/2 + 1 .. N - 1, each given every token of the chunk before it), so figures
             compare with llama.cpp's published tables

The KV cache is stored as the LLM's kv_dtype (so int8 KV is scored too). Windows of `window` tokens advance
by `stride`; each window is one scoring request through the engine (every position computed, prompt logprobs
taken chunk by chunk) and scores only the tokens the previous window did not, each with at least
window - stride tokens of context (except at the start). PPL = exp(mean NLL over all scored tokens). The first token of the text is never
scored (nothing predicts it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tierlm.engine.sampler import SamplingParams
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


def llamacpp_chunks(n_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of llama-perplexity's chunks: non-overlapping windows, the tokens
    past the chunk's middle scored (its `first = n_ctx / 2` logits predict tokens first + 1 .. n_ctx - 1)."""
    if window < 4:
        raise UsageError(f"the llama.cpp scheme needs a window of at least 4 tokens, got {window}")
    if n_tokens < window:
        raise UsageError(f"the llama.cpp scheme needs at least one whole window: {n_tokens} tokens < {window}")
    return [(c * window, (c + 1) * window, c * window + window // 2 + 1) for c in range(n_tokens // window)]


def perplexity(llm, ids: list[int], window: int, stride: int, label: str, progress: bool | None = None,
               scheme: str = "sliding") -> PplResult:
    """Perplexity of token ids `ids` under `llm` (an LLM) in `scheme` (see above): each window is one scoring
    request through its engine (prompt_logprobs=0, max_tokens=0), whose prompt is prefilled whole (no prefix
    hit). `stride` is the sliding scheme's."""
    if window > llm.runner.max_context:
        raise UsageError(f"window {window} exceeds the context served ({llm.runner.max_context})")
    if scheme not in ("sliding", "llama.cpp"):
        raise UsageError(f"unknown perplexity scheme {scheme!r} (sliding, llama.cpp)")
    if scheme == "sliding" and stride >= window and len(ids) > window:
        # a later window's first scored token needs one before it in it
        raise UsageError(f"stride must be below the window ({window}) when the text spans several windows, "
                         f"got {stride}")
    bos = llm.tokenizer.bos_token_id if llm.tokenizer.add_bos else None
    plan = llamacpp_chunks(len(ids), window) if scheme == "llama.cpp" else windows(len(ids), window, stride)
    nll, count = 0.0, 0
    bar = progress_bar(len(plan), f"perplexity {label}", progress, unit="window")
    t0 = time.perf_counter()
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    for begin, end, first in plan:
        chunk = ids[begin:end]
        if scheme == "llama.cpp" and bos is not None:
            chunk = [bos] + chunk[1:]  # as llama-perplexity: every chunk starts at BOS
        out = llm.generate([chunk], params)[0]
        # prompt_logprobs[j]: log p(token begin + j | the window's tokens before it); score targets first..end-1
        scored = out.prompt_logprobs[first - begin:end - begin]
        nll -= sum(lp.logprob for lp in scored)
        count += len(scored)
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
