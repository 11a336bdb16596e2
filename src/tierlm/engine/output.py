"""What a request returns (RequestOutput, GenerationMetrics) and the checks every request passes before it
is queued (check_request). The loop that produces them is engine/engine.py."""
from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.config import ModelConfig
from tierlm.engine.sampler import SamplingParams
from tierlm.errors import ContextLengthError, KVCacheFullError, UsageError
from tierlm.kvcache.paged import PagedKV
from tierlm.offload.stats import TierStats


@dataclass
class GenerationMetrics:
    prompt_tokens: int = 0
    ttft_s: float = 0.0  # queueing + prefill + first sampled token
    decode_s: float = 0.0  # every later token (the gaps between consecutive tokens)
    decode_tokens: int = 0
    tiers: TierStats = field(default_factory=TierStats)  # the weight traffic while it ran (disk, host, device: offload/stats.py)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class RequestOutput:
    prompt: str | None = None  # None when the prompt was given as token ids
    prompt_token_ids: list[int] = field(default_factory=list)
    text: str = ""  # generated part only, stop string excluded
    token_ids: list[int] = field(default_factory=list)  # generated part only
    finish_reason: str = ""  # "stop" (EOS or stop string) | "length" | "abort" | "error"
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token, when asked for
    # with prompt_logprobs (vLLM's shape): None for the first prompt token (nothing predicts it), then a
    # TokenLogprob per prompt token given its prefix; None when not asked for
    prompt_logprobs: list | None = None
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (pool or KV tiers) at admission
    metrics: GenerationMetrics = field(default_factory=GenerationMetrics)


def check_request(cfg: ModelConfig, max_context: int, kv: PagedKV, prompt_ids: list[int],
                  params: SamplingParams) -> int:
    """Refuse a prompt that cannot run (empty, ids out of the vocabulary, longer than the context, more KV
    than the whole pool; max_tokens=0 without prompt_logprobs: nothing to return); return how many tokens it
    may generate. A scoring request (max_tokens=0) may fill the whole context: no token follows its prompt."""
    if not prompt_ids:
        raise UsageError("empty prompt")
    if min(prompt_ids) < 0 or max(prompt_ids) >= cfg.vocab_size:
        raise UsageError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    if params.max_tokens == 0 and params.prompt_logprobs is None:
        raise UsageError("max_tokens must be >= 1, got 0 (0 only scores a prompt: with prompt_logprobs)")
    if len(prompt_ids) > max_context or (len(prompt_ids) == max_context and params.max_tokens):
        what = "the model's context" if max_context == cfg.max_position_embeddings else "max_context"
        raise ContextLengthError(f"prompt is {len(prompt_ids)} tokens; {what} is {max_context}")
    max_new = min(params.max_tokens, max_context - len(prompt_ids))
    pool_tokens = kv.manager.floor * kv.block_size  # the pool never shrinks below it
    if len(prompt_ids) + max_new > pool_tokens:
        raise KVCacheFullError(f"{len(prompt_ids)} prompt + {max_new} new tokens need more KV than the pool's "
                               f"{pool_tokens} tokens: raise kv_memory (--kv-memory)")
    return max_new
