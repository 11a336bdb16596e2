"""The two Ray Serve deployments behind `tierlm serve --replicas N` (cluster.py deploys them):

    Ingress        one replica, bound to the HTTP proxy: reads each request, computes its prompt's prefix key
                   (the same tokenizer and chat template as the engine), forwards it to an engine replica
                   through a handle whose router (router.py) picks the replica, and relays the response back
    EngineReplica  N replicas: the model, the engine loop on a thread of its own and the single server's app
                   (server.engine_app); each forwarded request runs through that app (relay.run_app)

Failures: a replica that dies before a response starts is retried on another (Serve's router drops the dead
one); one that dies mid-stream ends the stream with an OpenAI error event and `data: [DONE]`, as an engine
error would; the client never waits on a dead replica. Serve restarts dead replicas (health checks).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import RequestCancelledError

from tierlm.engine.args import EngineArgs
from tierlm.serve.affinity import KEY_TOKENS, prefix_key, prompt_ids
from tierlm.serve.protocol import OpenAIError
from tierlm.serve.relay import REPLICA_HEADER, Forwarded, ResponseStart, run_app
from tierlm.serve.server import ServeArgs, engine_app, serve_engine_args, tenant_quotas

log = logging.getLogger("tierlm.serve")
RETRIES = 2  # more replicas tried when one dies before its response starts


@serve.deployment
class EngineReplica:
    def __init__(self, engine_args: EngineArgs, serve_args: ServeArgs):
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        # NOTE: the model loads on the thread that then steps it: torch's CPU thread pool stays warm for that
        # thread, and stepping from another halved decode speed (loop.py)
        self._thread = threading.Thread(target=self._engine, args=(engine_args, serve_args), name="tierlm-engine",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    def _engine(self, engine_args: EngineArgs, serve_args: ServeArgs) -> None:
        from tierlm import LLM
        try:
            self.llm = LLM.from_args(serve_engine_args(engine_args), tenant_quotas(serve_args))
            self.loop, self.app, self.model_name = engine_app(self.llm, serve_args)
        except BaseException as e:  # noqa: BLE001 - raised by __init__, where Serve reports it
            self._failure = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.llm.close()

    async def forward(self, req: Forwarded) -> AsyncIterator[ResponseStart | bytes]:
        async for item in run_app(self.app, req, self.replica_id):
            yield item

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the engine loop has stopped")

    def __del__(self) -> None:  # Serve calls this on shutdown, after running requests had their grace period
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
            self._thread.join(timeout=30)


async def _send_error(send, e: OpenAIError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in e.headers.items())]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _sse_error(message: str) -> bytes:
    err = OpenAIError(502, message, "server_error", code="replica_failed").body()
    return f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, engine, model: Any, block_size: int, key_tokens: int = KEY_TOKENS,
                 allow_special_tokens_in_content: bool = False):
        from tierlm.weights import open_model
        source = open_model(model)
        self.tokenizer = source.tokenizer  # NOTE: valid after close(); the weights are never read here
        source.close()
        self.engine = engine.options(stream=True)
        self.block_size, self.key_tokens = block_size, key_tokens
        self.special_in_content = allow_special_tokens_in_content  # the replicas' EngineArgs: the same ids
        self.draining = False
        self.in_flight = 0  # HTTP requests between their first byte and their response's last

    def __serve_build_asgi_app__(self):
        async def app(scope, receive, send) -> None:  # a function: uvicorn takes a bound method for ASGI 2
            await self.asgi(scope, receive, send)
        return app

    def drain(self) -> int:
        """Refuse new requests (503, as the single server while draining); the requests still in flight."""
        self.draining = True
        return self.in_flight

    async def asgi(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            self.in_flight += 1
            try:
                await self._http(scope, receive, send)
            finally:
                self.in_flight -= 1

    async def _http(self, scope: dict[str, Any], receive, send) -> None:
        if self.draining:
            await _send_error(send, OpenAIError(503, "the server is shutting down", "service_unavailable",
                                                code="draining", headers={"Retry-After": "5"}))
            return
        body = bytearray()
        while (message := await receive())["type"] == "http.request":
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        else:
            return  # the client left before sending its body
        headers = list(scope["headers"])
        target = next((v.decode() for k, v in headers if k.lower() == REPLICA_HEADER.encode()), None)
        ids = prompt_ids(scope["path"], bytes(body), self.tokenizer, self.special_in_content) \
            if scope["method"] == "POST" else None
        req = Forwarded(scope["method"], scope["path"], scope.get("query_string", b""), headers, bytes(body),
                        prefix_key(ids, self.block_size, self.key_tokens) if ids else None, target)
        await self._relay(req, send)

    async def _open(self, req: Forwarded) -> tuple[Any, ResponseStart | None, OpenAIError | None]:
        """A replica's response stream and its start, trying others while replicas die before starting."""
        failure = "no replica answered"
        for _ in range(1 + (0 if req.target else RETRIES)):
            stream = self.engine.forward.remote(req)
            try:
                return stream, await stream.__anext__(), None
            except asyncio.CancelledError:  # the client left while its request waited
                stream.cancel()
                raise
            except (RayActorError, ActorUnavailableError) as e:
                failure = f"the replica serving the request failed ({type(e).__name__})"
                log.warning("%s; %s", failure, "retrying on another" if not req.target else "it was asked for")
        return None, None, OpenAIError(503, failure + "; retry later", "service_unavailable", code="replica_failed",
                                       headers={"Retry-After": "1"})

    async def _relay(self, req: Forwarded, send) -> None:
        stream, start, error = await self._open(req)
        if error is not None:
            await _send_error(send, error)
            return
        await send({"type": "http.response.start", "status": start.status, "headers": start.headers})
        try:
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:  # the client left (Serve's proxy cancels this request)
            stream.cancel()  # NOTE: the replica's app is cancelled in turn and aborts the engine's requests
            raise
        except RequestCancelledError:
            return
        except RayError as e:  # the replica died mid-response
            if not start.is_event_stream:
                raise  # a JSON body cut short cannot be mended: the connection is dropped
            await send({"type": "http.response.body", "body": _sse_error(f"the replica serving the stream failed "
                                                                         f"({type(e).__name__}); retry the request"),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})
