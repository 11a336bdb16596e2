"""The server's front door, before any handler runs: who may call (the API keys), and how much a request may
make the process hold (its body) and for how long (slow clients).

    Guard(app, keys, guarded, limits, budget)    pure ASGI middleware (no BaseHTTPMiddleware: that one hides
                                                 the client's disconnect from the handler, and a request whose
                                                 client left would run on)
    BodyBudget(capacity)                         the bytes every request being served may hold, together
    HeaderTimeoutH11                             uvicorn's HTTP protocol with a deadline for a request's headers

A request body is refused before it is read when its Content-Length is past `max_body_bytes` (413); a body
without one is read up to the limit and refused there. Before a byte of it is read, the request takes
PARSE_FACTOR x its size from the BodyBudget (the raw bytes, pydantic's objects of them and what they become:
measured, a body of small messages grows 14x when parsed) and holds it until its response ends; when the
budget cannot give that, 503 with Retry-After. The budget is planned with the model's memory (the ledger's
"requests" reservation, EngineArgs.request_memory), so no mix of bodies takes the process past its budget.
The whole body must arrive within `body_timeout_s` (408), the headers within `header_timeout_s` (the
connection is closed): a slow client holds a connection, never the engine.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from tierlm.serve.protocol import OpenAIError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PARSE_FACTOR = 17  # bytes held per body byte while a request is served: the raw body + its parsed objects (<= 15x)
MIN_BODY_BYTES = 1 << 20
BODY_BYTES_PER_TOKEN = 24  # a token of text is a few characters, each up to 6 bytes in JSON ("\u00e9")


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int
    body_timeout_s: float = 30.0  # the whole body must have arrived by then
    header_timeout_s: float = 10.0  # a connection's next request line and headers, likewise


def default_max_body(max_context: int, request_memory: int) -> int:
    """A body that could hold a prompt of the whole context, at least 1 MiB; never more than the request
    budget can hold once parsed."""
    return max(1, min(max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_context), request_memory // PARSE_FACTOR))


WINDOW_CHARS = 4096  # a long text is counted in windows of this many characters
CUT_SLACK = 8  # tokens a cut between two windows may add to the count (a word's merges broken in two)


def surely_longer(backend, texts: list[str], limit: int) -> int | None:
    """A lower bound on the tokens of `texts` when it is certainly past `limit`, else None, found without
    tokenising more than a window at a time: a tokenizer holds ~440 bytes per token of what it encodes (a 5
    MiB prompt took 1.1 GiB to learn it was 2.6 M tokens long). No token is shorter than a byte, so a text of at
    most `limit` bytes needs no count; a longer one is counted window by window, each cut allowed CUT_SLACK
    tokens, until the count is surely past the limit. What passes is then tokenised whole, at most about
    limit + CUT_SLACK x cuts tokens."""
    if sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) <= limit:
        return None
    count = 0
    for text in texts:
        for i in range(0, len(text), WINDOW_CHARS):
            count += len(backend.encode(text[i:i + WINDOW_CHARS], add_special_tokens=False).ids) - CUT_SLACK
            if count > limit:
                return count
    return None


class BodyBudget:
    """The bytes requests may hold at once (their bodies, parsed). Used from the event loop's thread only."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.refused = capacity, 0, 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.capacity:
            self.refused += 1
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes
        assert self.used >= 0, "a request gave back more than it took"


def _error(status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None
           ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """An OpenAIError as raw ASGI parts (this runs before FastAPI's exception handlers)."""
    e = OpenAIError(status, message, type_, code=code, headers=headers)
    body = json.dumps(e.body()).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    return status, body, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          *extra]


async def _respond(send: Send, error: tuple[int, bytes, list[tuple[bytes, bytes]]]) -> None:
    status, body, headers = error
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app: ASGIApp, keys: dict[str, str], guarded: tuple[str, ...], limits: RequestLimits,
                 budget: BodyBudget):
        """keys: API key -> tenant ("" none); empty: no auth. guarded: path prefixes that need a key."""
        self.app, self.keys, self.guarded, self.limits, self.budget = app, keys, guarded, limits, budget

    def tenant_of(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The tenant of the request's one `Authorization: Bearer KEY` header, None when it names no key (a
        missing or second header, another scheme); keys are compared in constant time, every one of them."""
        given = [v for k, v in headers if k == b"authorization"]
        if len(given) != 1 or not given[0].startswith(b"Bearer "):
            return None
        token, found = given[0].removeprefix(b"Bearer "), None
        for key, tenant in self.keys.items():
            if hmac.compare_digest(token, key.encode()):
                found = tenant
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = ""
        headers = scope["headers"]
        if self.keys and scope["path"].startswith(self.guarded):
            if (tenant := self.tenant_of(headers)) is None:
                return await _respond(send, _error(401, "invalid API key", "authentication_error",
                                                   "invalid_api_key"))
            scope["state"]["tenant"] = tenant
        length = next((v for k, v in headers if k == b"content-length"), None)
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        if length is None and not chunked:
            return await self.app(scope, receive, send)  # no body (GET)
        limit = self.limits.max_body_bytes
        try:
            declared = int(length) if length is not None else limit
        except ValueError:
            return await _respond(send, _error(400, "bad Content-Length", "invalid_request_error", "bad_request"))
        if declared > limit:
            return await self._too_large(send)
        held = PARSE_FACTOR * max(declared, 1)
        if not self.budget.take(held):
            return await _respond(send, _error(
                503, "the server is holding as many request bodies as its memory allows; retry later",
                "service_unavailable", "request_memory", {"Retry-After": "1"}))
        try:
            try:
                body = await asyncio.wait_for(self._read(receive, limit), self.limits.body_timeout_s)
            except TimeoutError:
                return await _respond(send, _error(408, f"the request body did not arrive within "
                                                   f"{self.limits.body_timeout_s:.0f} s", "invalid_request_error",
                                                   "request_timeout"))
            if body is None:
                return await self._too_large(send)
            if body is False:
                return  # the client left while sending
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.budget.give(held)

    async def _too_large(self, send: Send) -> None:
        await _respond(send, _error(413, f"the request body is larger than {self.limits.max_body_bytes} bytes "
                                    "(--max-body-bytes)", "invalid_request_error", "request_too_large"))

    @staticmethod
    async def _read(receive: Receive, limit: int) -> bytes | None | bool:
        """The whole body; None past `limit` bytes (reading stops there), False when the client left."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            size += len(chunk := message.get("body", b""))
            if size > limit:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read once, then the connection's own messages (a disconnect reaches the handler)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request has not begun `header_timeout_s` after
    it opened or after its last response (uvicorn bounds headers in size, not in time: a client sending one
    byte a minute would hold its connection forever). Set the class attribute before serving."""
    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        cycle = self.cycle  # a new request replaces it: the timer then does nothing
        self.loop.call_later(self.header_timeout_s, lambda: self._expire(cycle))

    def _expire(self, cycle) -> None:
        if self.cycle is cycle and not self.transport.is_closing() and (cycle is None or cycle.response_complete):
            self.transport.close()
