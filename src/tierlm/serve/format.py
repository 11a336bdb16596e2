"""Response bodies in OpenAI's format: whole completions, stream chunks, usage, logprobs."""
from __future__ import annotations

import json
from typing import Any

from tierlm.engine.output import RequestOutput
from tierlm.engine.request import EngineRequest, RequestUpdate, TokenLogprob
from tierlm.weights.tokenizer import Tokenizer


def _token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def prompt_logprobs_json(tok: Tokenizer, lps: list[TokenLogprob | None], k: int) -> list:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then {token id: {logprob, rank, decoded_token}}
    for the prompt token and its k most likely alternatives."""
    entry = lambda i, lp, rank: {str(i): {"logprob": lp, "rank": rank, "decoded_token": _token_text(tok, i)}}  # noqa: E731
    return [None if x is None else entry(x.token_id, x.logprob, x.rank) |
            {key: v for j, (i, lp) in enumerate(x.top[:k]) if i != x.token_id
             for key, v in entry(i, lp, j + 1).items()}
            for x in lps]


class Choices:
    """Accumulates each choice's text, finish reason and logprobs from the engine's updates, and renders
    deltas. kind: "chat" (chat.completion) or "text" (text_completion). logprobs: the top alternatives per
    token (None: no logprobs). echo (completions): the prompt's text, sent before each choice's completion, with
    the prompt's logprobs when logprobs are asked (read from the choice's output, filled when its prompt was
    computed, before its first update). prompt_k: vLLM's prompt_logprobs as asked (None: not asked)."""

    def __init__(self, kind: str, n: int, tokenizer: Tokenizer, logprobs: int | None, outs: list[RequestOutput] = (),
                 echo: str | None = None, prompt_k: int | None = None):
        self.kind, self.tokenizer, self.outs, self.echo, self.prompt_k = kind, tokenizer, outs, echo, prompt_k
        self.logprobs, self.top_k = logprobs is not None, logprobs or 0
        self.text = [""] * n
        self.finish = [None] * n
        self.lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.echoed = [echo is None] * n  # whether the choice's text already begins with the echoed prompt
        self.base = [0] * n  # where its completion's text_offset starts (after the echoed prompt's tokens)
        self.prompt_sent = [prompt_k is None] * n  # whether its vLLM-style prompt_logprobs went out (once)

    def take_prompt_logprobs(self, index: int) -> list | None:
        """The choice's `prompt_logprobs` (vLLM's extension) once, when they were asked for and are computed."""
        lps = self.outs[index].prompt_logprobs if self.outs else None
        if self.prompt_sent[index] or lps is None or len(lps) < len(self.outs[index].prompt_token_ids):
            return None
        self.prompt_sent[index] = True
        return prompt_logprobs_json(self.tokenizer, lps, self.prompt_k)

    def _echo(self, index: int) -> tuple[str, dict[str, list] | None]:
        """The prompt's part of a choice once (its text, and its legacy logprobs when asked), then nothing. A
        prompt whose logprobs are not all there (the request failed first) gets null for the missing ones."""
        if self.echoed[index]:
            return "", None
        self.echoed[index] = True
        self.base[index] = len(self.echo)
        if not self.logprobs:
            return self.echo, None
        out = self.outs[index]
        t = lambda i: _token_text(self.tokenizer, i)  # noqa: E731
        toks = out.prompt_token_ids
        lps = (out.prompt_logprobs or [None])[1:len(toks)]  # the first prompt token has no logprob
        lps += [None] * (len(toks) - 1 - len(lps))
        offsets, at = [], 0
        for i in toks:
            offsets.append(at)
            at += len(t(i))
        self.base[index] = at  # offsets count token texts: the completion's continue from the prompt's last
        return self.echo, {"tokens": [t(i) for i in toks],
                           "token_logprobs": [None] + [x.logprob if x else None for x in lps],
                           "top_logprobs": [None] + [{t(i): lp for i, lp in x.top[:self.top_k]} if x else None
                                                     for x in lps],
                           "text_offset": offsets}

    @staticmethod
    def _join(head: dict[str, list] | None, tail: dict[str, Any] | None) -> dict[str, Any] | None:
        return tail if head is None else {k: head[k] + (tail[k] if tail else []) for k in head}

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
        echo, echo_lps = self._echo(index)
        c: dict[str, Any] = {"index": index,
                             "logprobs": self._join(echo_lps, self._logprobs(self.lps[index], self.base[index])),
                             "finish_reason": self.finish[index]}
        if self.kind == "chat":
            c["message"] = {"role": "assistant", "content": self.text[index]}
        else:
            c["text"] = echo + self.text[index]
        if self.kind == "text" and (plps := self.take_prompt_logprobs(index)) is not None:
            c["prompt_logprobs"] = plps  # chat: at the top level of the response (completion_json), as vLLM
        return c

    def role_delta(self, index: int) -> dict[str, Any]:
        """A chat stream's first chunk for a choice: the role, as OpenAI sends it."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, u: RequestUpdate) -> dict[str, Any]:
        echo, echo_lps = self._echo(index)
        offset = self.base[index] + len(self.text[index])
        self.add(index, u)
        c: dict[str, Any] = {"index": index, "logprobs": self._join(echo_lps, self._logprobs(list(u.logprobs), offset)),
                             "finish_reason": u.finish_reason if u.finished else None}
        if self.kind == "chat":
            c["delta"] = {"content": u.text} if u.text else {}
        else:
            c["text"] = echo + u.text
        if self.kind == "text" and (plps := self.take_prompt_logprobs(index)) is not None:
            c["prompt_logprobs"] = plps  # streamed: in the choice's first chunk after its prompt ran
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
    body = {"id": rid, "object": _object(kind, False), "created": created, "model": model,
            "choices": [choices.choice(i) for i in range(len(choices.text))], "usage": usage}
    if kind == "chat" and choices.outs and (plps := choices.take_prompt_logprobs(0)) is not None:
        body["prompt_logprobs"] = plps  # n choices, one prompt
    return body


def chunk_json(kind: str, rid: str, created: int, model: str, choices: list[dict[str, Any]], include_usage: bool,
               usage: dict[str, Any] | None = None, prompt_logprobs: list | None = None) -> str:
    """One server-sent event. With include_usage every chunk carries "usage": null and the last one (no
    choices) the totals, as OpenAI does; a chat stream's prompt_logprobs (vLLM's) come at the top level of the
    first chunk after the prompt ran."""
    body: dict[str, Any] = {"id": rid, "object": _object(kind, True), "created": created, "model": model,
                            "choices": choices}
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs
    if include_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"
