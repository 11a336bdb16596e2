"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p), seeded per request."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tierlm.errors import UsageError


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what a torch.Generator takes (and seed + choice index stays inside)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # ... and this times how often it was generated
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the k most likely
    min_tokens: int = 0  # end-of-sequence tokens cannot be sampled before this many tokens (vLLM's, llama.cpp's)
    # vLLM's: None: off; 0: the logprob of each prompt token given its prefix; k > 0: and the k most likely. Such
    # a request prefills its whole prompt (no prefix-cache hit); with it, max_tokens may be 0 (scoring only).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise UsageError(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 0:  # 0 only for prompt scoring: check_request (engine/output.py) enforces it
            raise UsageError(f"max_tokens must be >= 1 (0 only with prompt_logprobs), got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise UsageError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise UsageError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise UsageError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise UsageError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW are greedy (as vLLM's): dividing logits by 1e-300 makes infinities."""
        return self.temperature < GREEDY_BELOW


class Sampler:
    """Turns logits [B, V] into token ids [B]. One generator per request makes seeded runs reproducible."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def penalise(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """logits [1, V] with the presence/frequency penalties of the tokens generated so far (a new tensor)."""
        p = self.params
        if not generated or (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0):
            return logits
        counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[-1])[:logits.shape[-1]]
        counts = counts.to(logits.device, torch.float32)
        return logits.float() - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.greedy:
            return logits.argmax(dim=-1)
        # The generator lives on the CPU; [B, V] per step is a small copy from a GPU.
        logits = logits.float().cpu() / p.temperature  # [B, V]
        if p.top_k:
            # Exactly k tokens, ties broken by the lower id as argmax breaks them (bf16 logits tie often), so
            # top_k=1 is greedy: a stable descending sort orders equal logits by id.
            order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :p.top_k]  # [B, k]
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, True)
            logits = logits.masked_fill(~keep, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1, stable=True)  # [B, V]; ties as top_k's
            cum = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token when the mass before it already reaches top_p (the first token always stays).
            drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
            drop[:, 0] = False  # explicitly: a top_p below fp32's smallest (5e-324) compares as 0 >= 0
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
