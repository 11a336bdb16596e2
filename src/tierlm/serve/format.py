"""Response bodies in OpenAI's format: whole completions, stream chunks, usage, logprobs."""
from __future__ import annotations

import json
from typing import Any

from tierlm.engine.request import EngineRequest, RequestUpdate, TokenLogprob
from tierlm.weights.tokenizer import Tokenizer


def _token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


class Choices:
    """Accumulates each choice's text, finish reason and logprobs from the engine's updates, and renders
    deltas. kind: "chat" (chat.completion) or "text" (text_completion)."""

    def __init__(self, kind: str, n: int, tokenizer: Tokenizer, logprobs: bool):
        self.kind, self.tokenizer, self.logprobs = kind, tokenizer, logprobs
        self.text = [""] * n
        self.finish = [None] * n
        self.lps: list[list[TokenLogprob]] = [[] for _ in range(n)]

    def add(self, index: int, u: RequestUpdate) -> None:
        self.text[index] += u.text
        self.lps[index].extend(u.logprobs)
        if u.finished:
            self.finish[index] = u.finish_reason

    def _logprobs(self, lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        t = lambda i: _token_text(self.tokenizer, i)  # noqa: E731
        if self.kind == "chat":
            entry = lambda i, lp: {"token": t(i), "logprob": lp, "bytes": list(t(i).encode())}  # noqa: E731
            return {"content": [entry(x.token_id, x.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in x.top]}
                                for x in lps]}
        offsets, at = [], offset
        for x in lps:
            offsets.append(at)
            at += len(t(x.token_id))
        return {"tokens": [t(x.token_id) for x in lps], "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{t(i): lp for i, lp in x.top} for x in lps], "text_offset": offsets}

    def choice(self, index: int) -> dict[str, Any]:
        c: dict[str, Any] = {"index": index, "logprobs": self._logprobs(self.lps[index]),
                             "finish_reason": self.finish[index]}
        if self.kind == "chat":
            c["message"] = {"role": "assistant", "content": self.text[index]}
        else:
            c["text"] = self.text[index]
        return c

    def role_delta(self, index: int) -> dict[str, Any]:
        """A chat stream's first chunk for a choice: the role, as OpenAI sends it."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, u: RequestUpdate) -> dict[str, Any]:
        offset = len(self.text[index])
        self.add(index, u)
        c: dict[str, Any] = {"index": index, "logprobs": self._logprobs(list(u.logprobs), offset),
                             "finish_reason": u.finish_reason if u.finished else None}
        if self.kind == "chat":
            c["delta"] = {"content": u.text} if u.text else {}
        else:
            c["text"] = u.text
        return c


def usage_json(reqs: list[EngineRequest]) -> dict[str, Any]:
    prompt = len(reqs[0].prompt_ids) if reqs else 0  # n choices share one prompt
    completion = sum(len(r.out.token_ids) for r in reqs)
    cached = reqs[0].out.cached_tokens if reqs else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _object(kind: str, chunk: bool) -> str:
    return ("chat.completion.chunk" if chunk else "chat.completion") if kind == "chat" else "text_completion"


def completion_json(kind: str, rid: str, created: int, model: str, choices: Choices,
                    usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": _object(kind, False), "created": created, "model": model,
            "choices": [choices.choice(i) for i in range(len(choices.text))], "usage": usage}


def chunk_json(kind: str, rid: str, created: int, model: str, choices: list[dict[str, Any]], include_usage: bool,
               usage: dict[str, Any] | None = None) -> str:
    """One server-sent event. With include_usage every chunk carries "usage": null and the last one (no
    choices) the totals, as OpenAI does."""
    body: dict[str, Any] = {"id": rid, "object": _object(kind, True), "created": created, "model": model,
                            "choices": choices}
    if include_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"
