"""The server's own arguments (the engine's are engine/args.EngineArgs): light to import, so the CLI builds its
parser from these defaults without loading the web stack."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # default: $TIERLM_API_KEY; None = no key needed
    max_queue: int = 256  # waiting requests before 429
    served_model_name: str | None = None
    drain_timeout: float = 30.0  # seconds running requests get to finish on SIGTERM
    tenants: tuple[str, ...] = ()  # "KEY=NAME:running=N,queued=N,kv_blocks=N" (engine/quota.py)
    protect_metrics: bool = False  # /metrics needs a key too (when keys are set)
    max_body_bytes: int | None = None  # default: serve/guard.default_max_body (the context, the request memory)
    body_timeout: float = 30.0  # seconds for a request's whole body
    header_timeout: float = 10.0  # seconds for a connection's request line and headers
    max_connections: int = 1024  # open connections (and requests) before new ones get 503 (uvicorn's limit)


REQUEST_MEMORY = "64MiB"  # EngineArgs.request_memory when serving and not given
