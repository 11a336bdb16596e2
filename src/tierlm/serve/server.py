"""Running the server: the model loaded once, the engine loop started, uvicorn serving the app on
127.0.0.1 by default. SIGTERM/SIGINT drain: new requests get 503, running ones finish up to the drain
deadline (then they are aborted), and the process exits."""
from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from tierlm.engine.args import EngineArgs
from tierlm.serve.app import create_app
from tierlm.serve.loop import EngineLoop

log = logging.getLogger("tierlm.serve")


@dataclass
class ServeArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # default: $TIERLM_API_KEY; None = no key needed
    max_queue: int = 256  # waiting requests before 429
    served_model_name: str | None = None
    drain_timeout: float = 30.0  # seconds running requests get to finish on SIGTERM


def default_model_name(llm) -> str:
    path = getattr(llm.source, "path", None)
    return Path(path).stem if path else (llm.config.name or llm.config.arch)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server whose first exit signal drains the engine before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, loop: EngineLoop, drain_timeout: float):
        super().__init__(config)
        self.engine_loop, self.drain_timeout = loop, drain_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self._draining = True
        log.info("draining: new requests get 503; running ones have %.0f s to finish", self.drain_timeout)

        def drain() -> None:
            self.engine_loop.drain(self.drain_timeout)
            super(_DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=drain, name="tierlm-drain", daemon=True).start()


def serve(engine_args: EngineArgs, args: ServeArgs) -> int:
    from tierlm import LLM

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    llm = LLM.from_args(engine_args)
    loop = EngineLoop(llm.engine, args.max_queue)
    name = args.served_model_name or default_model_name(llm)
    key = args.api_key if args.api_key is not None else os.environ.get("TIERLM_API_KEY") or None
    app = create_app(llm, loop, name, key)
    loop.start()
    log.info("serving %s on http://%s:%d/v1 (context %d, KV %d blocks)", name, args.host, args.port,
             llm.max_context, llm.kv.manager.num_blocks)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    # uvicorn re-raises the signal that stopped it once it has shut down, to the handler that was there
    # before it: make that one a no-op, so a drained SIGTERM ends with exit code 0, not a kill.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        _DrainingServer(config, loop, args.drain_timeout).run()
    finally:
        loop.stop()
        llm.close()
    return 0
