"""Running the server: the model loaded once, uvicorn serving the app on 127.0.0.1 by default from a thread,
the engine loop on the main thread. SIGTERM/SIGINT drain: new requests get 503, running ones finish up to
the drain deadline (then they are aborted), and the process exits 0."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from tierlm.config import parse_size
from tierlm.engine.args import EngineArgs
from tierlm.engine.pressure_control import PressureControl
from tierlm.engine.quota import Quota, parse_tenant
from tierlm.errors import UsageError
from tierlm.serve.app import create_app
from tierlm.serve.guard import PARSE_FACTOR, BodyBudget, HeaderTimeoutH11, RequestLimits, default_max_body
from tierlm.serve.args import REQUEST_MEMORY, ServeArgs
from tierlm.serve.loop import EngineLoop

log = logging.getLogger("tierlm.serve")


def default_model_name(source) -> str:
    """The model id clients send by default: the file's name (a ModelSource's, as LLM.source)."""
    path = getattr(source, "path", None)
    return Path(path).stem if path else (source.config.name or source.config.arch)


def given_api_key(args: ServeArgs) -> str | None:
    """The key as given: --api-key, else $TIERLM_API_KEY (None: neither)."""
    return args.api_key if args.api_key is not None else os.environ.get("TIERLM_API_KEY")


def api_key(args: ServeArgs) -> str | None:
    """The key clients must send; None (no auth) when none is given. cluster.py hands replicas "" for none."""
    return given_api_key(args) or None


def check_api_key(args: ServeArgs) -> None:
    """An empty key given at start would turn authentication off without a word: refused."""
    if (key := given_api_key(args)) is not None and not key.strip():
        raise UsageError("the API key is empty (--api-key or $TIERLM_API_KEY): give a key, or neither for no auth")


def tenant_quotas(args: ServeArgs) -> dict[str, Quota]:
    """Tenant name -> Quota of the --tenant specs (a bad spec raises): what the engine admits by, given to it
    when the model loads (LLM.from_args(engine_args, quotas))."""
    return {name: quota for _, name, quota in map(parse_tenant, args.tenants)}


def engine_app(llm, args: ServeArgs) -> tuple[EngineLoop, FastAPI, str]:
    """The engine loop (not started) and the HTTP app over a model loaded with the tenants' quotas, and the
    model id it serves: one of each in `tierlm serve`, one per replica on Ray Serve (cluster.py)."""
    parsed = [parse_tenant(t) for t in args.tenants]
    if llm.engine.scheduler.quotas != {name: quota for _, name, quota in parsed}:
        raise UsageError("the model was loaded without these tenants' quotas: "
                         "LLM.from_args(engine_args, tenant_quotas(serve_args))")
    loop = EngineLoop(llm.engine, args.max_queue, PressureControl(llm.engine, llm.memory))
    name = args.served_model_name or default_model_name(llm.source)
    if not llm.request_bytes:
        raise UsageError("the model was loaded without request memory: EngineArgs.request_memory (serve_engine_args)")
    limits = RequestLimits(args.max_body_bytes or default_max_body(llm.max_context, llm.request_bytes),
                           args.body_timeout, args.header_timeout)
    if PARSE_FACTOR * limits.max_body_bytes > llm.request_bytes:
        raise UsageError(f"--max-body-bytes {args.max_body_bytes} needs {PARSE_FACTOR}x its size of request memory; "
                         f"--request-memory is {llm.request_bytes} bytes")
    keys = {k: tenant for k, tenant, _ in parsed} | ({key: ""} if (key := api_key(args)) else {})
    app = create_app(llm, loop, name, keys, args.protect_metrics, limits, BodyBudget(llm.request_bytes))
    return loop, app, name


def serve_engine_args(engine_args: EngineArgs) -> EngineArgs:
    """The engine arguments a server loads with: request memory planned (REQUEST_MEMORY unless given)."""
    return engine_args if parse_size(engine_args.request_memory) else replace(engine_args, request_memory=REQUEST_MEMORY)


def serve(engine_args: EngineArgs, args: ServeArgs) -> int:
    """Load the model, serve HTTP from a thread and step the engine on this (the main) thread until a signal
    has drained it. SIGTERM/SIGINT: new requests get 503, running ones get drain_timeout seconds to finish
    (then they are aborted), uvicorn shuts down, exit code 0. A second signal stops at once."""
    from tierlm import LLM

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quotas = tenant_quotas(args)  # bad specs fail before the model loads
    llm = LLM.from_args(serve_engine_args(engine_args), quotas)
    loop, app, name = engine_app(llm, args)
    protocol = type("H11", (HeaderTimeoutH11,), {"header_timeout_s": args.header_timeout})
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5,
                            http=protocol, limit_concurrency=args.max_connections)
    server = uvicorn.Server(config)  # in a thread, uvicorn installs no signal handlers: they are ours
    http = threading.Thread(target=server.run, name="tierlm-http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not server.started:
        llm.close()
        raise UsageError(f"cannot serve on {args.host}:{args.port} (address in use or not available)")
    log.info("serving %s on http://%s:%d/v1 (context %d, KV %d blocks)", name, args.host, args.port,
             llm.max_context, llm.kv.manager.num_blocks)

    def shut_down() -> None:
        loop.drain(args.drain_timeout)
        server.should_exit = True
        http.join(timeout=30)
        loop.stop()

    def on_signal(signum, frame) -> None:
        if loop.draining:  # a second signal: now
            server.should_exit = True
            loop.stop()
            return
        log.info("draining: new requests get 503; running ones have %.0f s to finish", args.drain_timeout)
        threading.Thread(target=shut_down, name="tierlm-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        loop.run_forever()
    finally:
        server.should_exit = True
        http.join(timeout=30)
        llm.close()
    return 0
