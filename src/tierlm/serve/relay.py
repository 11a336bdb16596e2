"""One HTTP request carried from the ingress to an engine replica and its response carried back, over Ray
Serve handles (no sockets between them). The replica runs the request through the same FastAPI app as the
single-process server (app.py), so routes, errors, auth and streaming behave identically.

    Forwarded        what the ingress read: method, path, headers, body + the routing inputs
    ResponseStart    the app's status and headers, the first item of a response; bytes follow
    run_app(...)     replica side: the app called with ASGI directly, its messages yielded as they come
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

REPLICA_HEADER = "x-tierlm-replica"  # response: the replica that served; request: serve it there (ops, tests)


@dataclass
class Forwarded:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    prefix_key: int | None = None  # affinity.prefix_key of the prompt; None: not a prompt (any replica)
    target: str | None = None  # a replica id the client asked for (REPLICA_HEADER)


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]

    @property
    def is_event_stream(self) -> bool:
        return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in self.headers)


def _scope(req: Forwarded) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
            "query_string": req.query_string, "root_path": "", "headers": req.headers,
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}


async def run_app(app: Callable, req: Forwarded, replica_id: str) -> AsyncIterator[ResponseStart | bytes]:
    """The app's response to `req`: a ResponseStart (with REPLICA_HEADER added), then body chunks as the app
    sends them. Closing this early (the ingress cancelled: its client left) tells the app the client
    disconnected and cancels it, so the engine aborts the request as it would for a direct client."""
    messages: asyncio.Queue = asyncio.Queue()
    body_given = False
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()  # NOTE: the app polls this for disconnects; it only ever learns of one
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.put_nowait(message)

    task = asyncio.create_task(app(_scope(req), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    complete = False
    try:
        ended = False
        while not ended and (m := await messages.get()) is not None:
            if m["type"] == "http.response.start":
                served_by = (REPLICA_HEADER.encode(), replica_id.encode())
                yield ResponseStart(m["status"], [*m.get("headers", []), served_by])
                continue
            body, more = bytearray(m.get("body", b"")), m.get("more_body", False)
            # NOTE: chunks that queued while the last item was relayed go as one item: each item costs a Ray
            # object and two hops (replica -> ingress -> proxy), so a relay that falls behind catches up
            while more and not messages.empty():
                if (m := messages.get_nowait()) is None:
                    ended = True
                    break
                body += m.get("body", b"")
                more = m.get("more_body", False)
            if body:
                yield bytes(body)
            if not more:
                complete = True
                return
        task.result()  # the app ended without a whole response: its exception, if it raised one
        raise RuntimeError(f"the app sent no complete response to {req.method} {req.path}")
    finally:
        gone.set()
        if not complete:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
