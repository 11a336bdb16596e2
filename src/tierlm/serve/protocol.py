"""The OpenAI wire format: request bodies (validated by pydantic), errors in OpenAI's shape, and the
SamplingParams a request asks for. Unknown fields are accepted and ignored, as OpenAI-compatible servers do."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tierlm.engine.sampler import SEED_MAX, SEED_MIN, SamplingParams

MAX_N = 16  # choices per request: each is a request of its own in the engine
MAX_MESSAGES = 2048  # per chat request: each parsed message costs ~14x its bytes (serve/guard.py)
TOKEN_ID_END = 2 ** 32  # token ids are u32 in the tokenizer (the model's vocabulary, far smaller, is the engine's)


def _valid_text(value: Any) -> Any:
    """Every string inside value (a string, or lists / dicts of them) is valid Unicode: JSON can carry lone UTF-16
    surrogates ("\\ud800"), which no tokenizer can encode (a 400 here, not a 500 there)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text is not valid Unicode (a lone surrogate)") from None
    elif isinstance(value, list):
        for v in value:
            _valid_text(v)
    elif isinstance(value, dict):
        for v in value.values():
            _valid_text(v)
    return value


class OpenAIError(Exception):
    """An error the client caused or must know about, sent as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # not OpenAI's; vLLM's extension (-1 or 0 = off)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX - MAX_N)  # choice i samples with seed + i
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False  # vLLM's extension (benchmarks)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's and llama-cpp-python's extension
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's: each prompt token's logprob (+ top k)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = _valid_text([v] if isinstance(v, str) else list(v or []))
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops

    def sampling(self, max_tokens: int | None, logprobs: int | None, index: int,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """Choice `index` of n: with a seed, choice i samples with seed + i (distinct, reproducible).
        max_tokens None: 256; 0 (completions with echo only): the prompt is scored, nothing generated."""
        max_tokens = 256 if max_tokens is None else max_tokens
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
                              max_tokens=max_tokens, seed=None if self.seed is None else self.seed + index,
                              stop=list(self.stop or []), ignore_eos=self.ignore_eos,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logprobs=logprobs, min_tokens=min(self.min_tokens, max_tokens),
                              prompt_logprobs=prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    _content_is_text = field_validator("content")(classmethod(lambda cls, v: _valid_text(v)))

    def text(self) -> str:
        """Content as text: a list of parts keeps its text parts (images and audio are not supported)."""
        if isinstance(self.content, list):
            if any(p.get("type") != "text" for p in self.content):
                raise OpenAIError(400, "only text content parts are supported", param="messages")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def params(self, index: int = 0) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return self.sampling(self.max_completion_tokens or self.max_tokens,
                             (self.top_logprobs or 0) if self.logprobs else None, index, self.prompt_logprobs)

    def chat_messages(self) -> list[dict[str, str]]:
        role = {"developer": "system"}  # OpenAI's newer name for the system role
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt (lm-eval-harness' loglikelihood)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False  # the prompt comes back before the completion, with its logprobs when logprobs is set

    @field_validator("prompt")
    @classmethod
    def _prompt_checked(cls, v: Any) -> Any:
        """Valid Unicode, and token ids the tokenizer can hold: an echo decodes the ids before the engine checks
        them against the vocabulary, and a negative or >= 2^32 id raised OverflowError there (a 500; found by
        tests/test_fuzz_api.py: {"prompt": [-1], "echo": true})."""
        ids = [x for p in (v if isinstance(v, list) else []) for x in (p if isinstance(p, list) else [p])]
        if any(isinstance(x, int) and not 0 <= x < TOKEN_ID_END for x in ids):
            raise ValueError("prompt token ids must be in [0, 2^32) (and in the model's vocabulary)")
        return _valid_text(v)

    def params(self, index: int = 0) -> SamplingParams:
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError(400, "max_tokens must be >= 1 (0 only with echo: the prompt is scored)",
                              param="max_tokens")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:  # the echoed prompt carries logprobs: every position computed
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        if self.max_tokens == 0 and prompt_logprobs is None:
            prompt_logprobs = 0  # nothing generated: a request that only runs its prompt
        max_tokens = 16 if self.max_tokens is None else self.max_tokens  # OpenAI's completions default: 16
        return self.sampling(max_tokens, self.logprobs, index, prompt_logprobs)

    def single_prompt(self) -> str | list[int]:
        """One prompt (string or token ids); a batch of prompts is refused with a clear error."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise OpenAIError(400, "send one prompt per request (use n for several choices)", param="prompt")
            p = p[0]
        if isinstance(p, list) and not p:
            raise OpenAIError(400, "prompt is empty", param="prompt")
        return p
