"""`tierlm serve`: an OpenAI-compatible HTTP API (FastAPI) over the engine loop on its own thread.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streamed as server-sent events ending with
`data: [DONE]`, or whole), GET /v1/models, GET /health, GET /metrics. Every error is OpenAI's shape
{"error": {"message", "type", "param", "code"}}: 400 bad parameters or a prompt past the context, 401 a
wrong key, 404 an unknown model, 429 a full queue (Retry-After), 503 while draining. A client that goes
away aborts its requests at once (their KV blocks are freed by the next engine step).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierlm.engine.request import EngineRequest, RequestUpdate
from tierlm.errors import TierlmError
from tierlm.memory.pressure import Level
from tierlm.serve.format import Choices, chunk_json, completion_json, usage_json
from tierlm.serve.guard import BodyBudget, Guard, RequestLimits, surely_longer
from tierlm.serve.loop import EngineLoop
from tierlm.serve.metrics import Metrics
from tierlm.serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

DISCONNECT_POLL_S = 0.5


def _error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(llm, loop: EngineLoop, model_name: str, keys: dict[str, str], protect_metrics: bool,
               limits: RequestLimits, budget: BodyBudget) -> FastAPI:
    """keys: API key -> tenant ("": none; the tenant's quota is the loop's), empty: no auth; protect_metrics:
    /metrics needs a key too (off by default, as vLLM: scrapers rarely carry one). limits and budget: what a
    request may send and hold (serve/guard.py)."""
    app = FastAPI(title="tierlm", docs_url=None, redoc_url=None)
    metrics = Metrics(loop, llm.memory, budget)
    app.state.metrics = metrics
    # the API's schema is guarded with it: it says which endpoints and fields exist
    guarded = ("/v1/", "/openapi.json") + (("/metrics",) if protect_metrics else ())
    app.add_middleware(Guard, keys=keys, guarded=guarded, limits=limits, budget=budget)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own errors ({"detail": ...}): a body json cannot read (not UTF-8, nested past the recursion
        # limit, an int of 4300+ digits), an unknown path or method: OpenAI's shape like every other error
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error_response(OpenAIError(e.status_code, str(e.detail), kind, headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        what = "malformed JSON body" if first.get("type") == "json_invalid" else first.get("msg", "invalid request")
        return _error_response(OpenAIError(400, f"{what}" + (f" ({where})" if where else ""), param=where))

    def check_length(texts: list[str], param: str) -> None:
        """A text far longer than the context is refused before it is tokenised whole (guard.surely_longer)."""
        if (n := surely_longer(llm.tokenizer.backend, texts, llm.max_context)) is not None:
            raise OpenAIError(400, f"the prompt is more than {n} tokens; the context is {llm.max_context}",
                              param=param, code="context_length_exceeded")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise OpenAIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                              param="model", code="model_not_found")

    def submit(ids: list[int], body, kind: str, tenant: str) -> tuple[list[EngineRequest], asyncio.Queue]:
        """The request's n choices into the engine, all or none."""
        queue: asyncio.Queue = asyncio.Queue()
        reqs: list[EngineRequest] = []
        try:
            for i in range(body.n):
                reqs.append(loop.submit(ids, body.params(i), queue, i, tenant))
        except TierlmError as e:  # the prompt cannot run here: too long, ids outside the vocabulary...
            for r in reqs:
                loop.abort(r.id)
            raise OpenAIError(400, str(e), param="messages" if kind == "chat" else "prompt") from None
        except OpenAIError:
            for r in reqs:
                loop.abort(r.id)
            raise
        metrics.requests_started(len(reqs))
        return reqs, queue

    async def updates(request: Request, reqs: list[EngineRequest], queue: asyncio.Queue
                      ) -> AsyncIterator[tuple[int, RequestUpdate]]:
        """Every update of `reqs` until all are finished; aborts them if the client leaves or this is closed.
        A watcher polls the connection, so each token is one plain queue.get() (no timer task per token)."""
        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            queue.put_nowait(None)  # the client left: wake the reader

        watcher = asyncio.create_task(watch())
        left = len(reqs)
        try:
            while left:
                item = await queue.get()
                if item is None:
                    return
                index, u = item
                left -= u.finished
                yield index, u
        finally:
            watcher.cancel()
            for r in reqs:
                if r.out.finish_reason == "":
                    loop.abort(r.id)

    async def respond(request: Request, body, ids: list[int], kind: str, echo: str | None = None) -> Response:
        check_model(body.model)
        reqs, queue = submit(ids, body, kind, request.state.tenant)  # 503 draining/pressure, 429 queue/quota
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        top = (body.top_logprobs or 0 if body.logprobs else None) if kind == "chat" else body.logprobs
        choices = Choices(kind, len(reqs), llm.tokenizer, top, [r.out for r in reqs], echo, body.prompt_logprobs)
        created = int(time.time())
        if not body.stream:
            async with aclosing(updates(request, reqs, queue)) as stream:
                async for index, u in stream:
                    choices.add(index, u)
                    if u.finish_reason == "error":
                        raise OpenAIError(500, f"generation failed: {u.error}", "server_error")
            if await request.is_disconnected():
                return Response(status_code=499)
            metrics.requests_finished(reqs)
            return JSONResponse(completion_json(kind, rid, created, model_name, choices, usage_json(reqs)))

        async def sse() -> AsyncIterator[str]:
            usage = body.include_usage
            if kind == "chat":
                for i in range(len(reqs)):
                    yield chunk_json(kind, rid, created, model_name, [choices.role_delta(i)], usage)
            failed = False
            async with aclosing(updates(request, reqs, queue)) as stream:
                async for index, u in stream:
                    if u.finish_reason == "error":
                        failed = True
                        err = OpenAIError(500, f"generation failed: {u.error}", "server_error").body()
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                    if u.text or u.finished or u.logprobs:
                        plps = choices.take_prompt_logprobs(index) if kind == "chat" and index == 0 else None
                        yield chunk_json(kind, rid, created, model_name, [choices.delta(index, u)], usage,
                                         prompt_logprobs=plps)
            if not failed:
                metrics.requests_finished(reqs)
                if usage:
                    yield chunk_json(kind, rid, created, model_name, [], usage, usage_json(reqs))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        messages = body.chat_messages()
        check_length([m["content"] for m in messages], "messages")
        try:
            ids = llm.encode_chat(messages)  # content is text: a typed control token cannot open a turn
        except TierlmError as e:
            raise OpenAIError(400, str(e), param="messages") from None
        return await respond(request, body, ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        prompt = body.single_prompt()
        # raw text, special-token strings included (as vLLM and llama.cpp): the caller writes every turn of it
        if isinstance(prompt, str):
            check_length([prompt], "prompt")
        ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        echo = None if not body.echo else prompt if isinstance(prompt, str) else llm.tokenizer.decode(ids)
        return await respond(request, body, ids, "text", echo)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(app.state.started),
                                            "owned_by": "tierlm", "max_model_len": llm.max_context}]}

    @app.get("/health")
    async def health() -> Response:
        s = loop.snapshot
        status = "draining" if loop.draining else "ok" if loop.healthy else "unhealthy"
        return JSONResponse({"status": status, "running": s.running, "waiting": s.waiting,
                             "step_errors": s.step_errors, "failed_passes_in_a_row": s.failed_passes_in_a_row,
                             "memory_pressure": Level(s.pressure).name.lower(),
                             "memory_fraction": round(s.pressure_fraction, 3)},
                            status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    app.state.started = time.time()
    return app
