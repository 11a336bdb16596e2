"""One request's generation loop: prefill, then decode token by token, streaming text deltas.

Text is re-decoded from all generated ids each step (byte-level BPE can split a character across
tokens); a delta is held back while it ends in an incomplete character or could be the start of a
stop string, so what is streamed is always a prefix of the final text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from tierlm.config import ModelConfig
from tierlm.engine.runner import Runner
from tierlm.engine.sampler import Sampler, SamplingParams
from tierlm.errors import ContextLengthError, KVCacheFullError, UsageError
from tierlm.kvcache.paged import PagedKV, Sequence
from tierlm.memory.stats import TierStats
from tierlm.weights.tokenizer import Tokenizer


@dataclass
class GenerationMetrics:
    prompt_tokens: int = 0
    ttft_s: float = 0.0  # prefill + first sampled token
    decode_s: float = 0.0  # every later token
    decode_tokens: int = 0
    tiers: TierStats = field(default_factory=TierStats)  # what this request moved between tiers

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class RequestOutput:
    prompt: str | None = None  # None when the prompt was given as token ids
    prompt_token_ids: list[int] = field(default_factory=list)
    text: str = ""  # generated part only, stop string excluded
    token_ids: list[int] = field(default_factory=list)  # generated part only
    finish_reason: str = ""  # "stop" (EOS or stop string) | "length"
    metrics: GenerationMetrics = field(default_factory=GenerationMetrics)


def find_stop(text: str, stops: list[str]) -> int:
    """Index where the earliest stop string begins, or -1."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else -1


def _safe_len(text: str, stops: list[str]) -> int:
    """How much of `text` can be streamed now: no trailing replacement char, no possible stop prefix."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


def check_request(cfg: ModelConfig, max_context: int, kv: PagedKV, prompt_ids: list[int],
                  params: SamplingParams) -> int:
    """Refuse a prompt that cannot run (empty, ids out of the vocabulary, longer than the context, more KV
    than the whole pool); return how many tokens it may generate."""
    if not prompt_ids:
        raise UsageError("empty prompt")
    if min(prompt_ids) < 0 or max(prompt_ids) >= cfg.vocab_size:
        raise UsageError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    if len(prompt_ids) >= max_context:
        what = "the model's context" if max_context == cfg.max_position_embeddings else "max_context"
        raise ContextLengthError(f"prompt is {len(prompt_ids)} tokens; {what} is {max_context}")
    max_new = min(params.max_tokens, max_context - len(prompt_ids))
    pool_tokens = kv.manager.num_blocks * kv.block_size
    if len(prompt_ids) + max_new > pool_tokens:
        raise KVCacheFullError(f"{len(prompt_ids)} prompt + {max_new} new tokens need more KV than the pool's "
                               f"{pool_tokens} tokens: raise kv_memory (--kv-memory)")
    return max_new


def generate_stream(runner: Runner, tokenizer: Tokenizer, kv: PagedKV, prompt_ids: list[int],
                    params: SamplingParams, out: RequestOutput) -> Iterator[str]:
    """Yield text deltas; fills `out` (text, token_ids, finish_reason, metrics) as it goes. The prompt's
    longest cached prefix in `kv` is reused (its prefill skipped); the sequence's blocks are returned at the
    end, its full blocks staying cached for later requests."""
    max_new = check_request(runner.config, runner.max_context, kv, prompt_ids, params)
    eos = frozenset() if params.ignore_eos else tokenizer.eos_token_ids
    sampler = Sampler(params)
    t0 = time.perf_counter()
    seq = Sequence(tokens=list(prompt_ids))
    kv.admit(seq)  # cached prefix blocks: prefill starts after them
    batch = kv.batch([seq])
    m = out.metrics
    m.prompt_tokens = len(prompt_ids)
    before = replace(runner.store.stats)
    emitted = 0
    try:
        todo = seq.tokens[seq.num_computed:]
        logits = runner.forward(torch.tensor([todo]), batch)  # [1, V]
        kv.note_prefill(len(todo), time.perf_counter() - t0)
        for step in range(max_new):
            token = int(sampler(logits)[0])
            now = time.perf_counter()
            if step == 0:
                m.ttft_s = now - t0
            else:
                m.decode_s += now - t0
                m.decode_tokens += 1
            if token in eos:
                out.finish_reason = "stop"
                break
            out.token_ids.append(token)
            seq.tokens.append(token)
            text = tokenizer.decode(out.token_ids)
            if (cut := find_stop(text, params.stop)) >= 0:
                out.text, out.finish_reason = text[:cut], "stop"
                break
            out.text = text
            safe = _safe_len(text, params.stop)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if step + 1 == max_new:
                out.finish_reason = "length"
                break
            t0 = time.perf_counter()
            logits = runner.forward(torch.tensor([[token]]), batch)
        if len(out.text) > emitted:
            yield out.text[emitted:]
    finally:
        kv.free(seq)
        m.tiers = runner.store.stats - before
