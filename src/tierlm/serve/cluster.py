"""`tierlm serve --replicas N`: N engine replicas on Ray Serve behind one OpenAI-compatible endpoint, routed
by prefix affinity with bounded load (router.py, affinity.py). The deployments are in replicas.py.

Python entry (tests and benchmarks use it; the CLI too):

    cluster = deploy(EngineArgs(model=None), replicas=2, routing="prefix", serve_args=ServeArgs(port=8000))
    cluster.url            "http://127.0.0.1:8000" (OpenAI clients: cluster.url + "/v1")
    cluster.replica_ids()  the live engine replicas (what REPLICA_HEADER names in responses and accepts in requests)
    cluster.shutdown()     Serve and, when deploy started it, Ray (module-level shutdown() does the same)

deploy starts a local Ray instance sized to this machine unless one is running (ray.init before deploy to use a
cluster of your own), and binds Serve's HTTP proxy to serve_args.host:port (127.0.0.1 by default).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve._private.constants import SERVE_CONTROLLER_NAME

from tierlm.engine.args import EngineArgs
from tierlm.errors import TierlmError, UsageError
from tierlm.serve.replicas import EngineReplica, Ingress
from tierlm.serve.router import POLICIES, AffinityRouter
from tierlm.serve.server import ServeArgs, api_key, default_model_name

APP = "tierlm"
OBJECT_STORE_BYTES = 256 << 20  # responses are small: Ray's default (30% of RAM) would only pin shared memory
HEALTH_CHECK_PERIOD_S = 2.0  # a dead replica is noticed (and restarted) within about this
REPLICA_SLACK = 16  # in-flight requests a replica takes beyond the engine's running + queued (/metrics, /health)
_REPLICA_PREFIX = f"SERVE_REPLICA::{APP}#{EngineReplica.name}#"

log = logging.getLogger("tierlm.serve")


@dataclass
class Cluster:
    url: str
    model_name: str
    replicas: int
    routing: str
    owns_ray: bool  # deploy started Ray, so shutdown stops it

    def replica_ids(self) -> list[str]:
        """The engine replicas alive now, by the id REPLICA_HEADER carries."""
        return sorted(a["name"].removeprefix(_REPLICA_PREFIX) for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == "serve" and a["name"].startswith(_REPLICA_PREFIX))

    def replica_actor(self, replica_id: str) -> ray.actor.ActorHandle:
        """The Ray actor of one replica (ray.kill it to see Serve replace it)."""
        return ray.get_actor(_REPLICA_PREFIX + replica_id, namespace="serve")

    def drain(self, timeout_s: float, cancel: threading.Event | None = None) -> int:
        """New requests get 503; wait until the running ones finish, `timeout_s` passes or `cancel` is set.
        Returns the requests still running (shutdown cuts them)."""
        ingress = serve.get_app_handle(APP)
        end = time.monotonic() + timeout_s
        while (left := ingress.drain.remote().result(timeout_s=10)) and time.monotonic() < end:
            if cancel is not None and cancel.is_set():
                break
            time.sleep(0.2)
        return left

    def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop Serve (after draining for up to drain_timeout seconds) and Ray if deploy started it."""
        if drain_timeout > 0:
            try:
                self.drain(drain_timeout)
            except Exception as e:  # noqa: BLE001 - a broken app must not keep Ray running
                log.warning("drain failed (%s); shutting down", e)
        serve.shutdown()
        if self.owns_ray:
            ray.shutdown()


def machine_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_port(host: str, port: int) -> None:
    """A busy port, in one line and at once (Ray's proxy reports it seconds later, as its actor's traceback)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot serve on {host}:{port} ({e.strerror})") from None


def _serve_running() -> bool:
    return ray.is_initialized() and any(a["name"] == SERVE_CONTROLLER_NAME and a["namespace"] == "serve"
                                        for a in ray.util.list_named_actors(all_namespaces=True))


def _start_ray(cpus: int) -> bool:
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a local server
    # Ray runs workers at nice 15 (its daemons keep the CPU); here the workers are the server: at 15 the
    # engines lose the cores to any ordinary process on the machine, a load generator included
    os.environ.setdefault("RAY_worker_niceness", "0")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 object_store_memory=OBJECT_STORE_BYTES)
    except BaseException:  # SystemExit(15) too: ray.init's SIGTERM handler, while it starts
        ray.shutdown()  # what it started (its agents would outlive this process)
        raise
    if callable(previous) and threading.current_thread() is threading.main_thread():
        # the caller's handler (the CLI's) over ray.init's, which aborts the process with a stack dump; without
        # one, Ray's stays: a default SIGTERM death would leave Ray's agent processes behind
        signal.signal(signal.SIGTERM, previous)
    return True


def _failure(app: str) -> str | None:
    """Why a deployment of `app` failed: the last line of its error, the exception its constructor raised
    (e.g. "BudgetError: ..."); Serve's own exception only names the deployment."""
    try:
        status = serve.status().applications.get(app)
    except Exception:  # noqa: BLE001 - no reason is better than a second error
        return None
    for d in status.deployments.values() if status else ():
        lines = [line for line in d.message.splitlines() if line.strip()]
        if d.status == "DEPLOY_FAILED" and lines:
            return lines[-1].strip().removeprefix("tierlm.errors.")
    return None


def deploy(engine_args: EngineArgs, replicas: int = 2, routing: str = "prefix",
           serve_args: ServeArgs | None = None) -> Cluster:
    """Deploy `replicas` engine replicas of `engine_args` behind one endpoint and wait until they serve.
    Each replica gets max(1, cpus // replicas) threads unless engine_args.threads says otherwise."""
    from tierlm.engine.quota import parse_tenant
    from tierlm.weights import open_model

    serve_args = serve_args or ServeArgs()
    if replicas < 1:
        raise UsageError(f"replicas must be >= 1, got {replicas}")
    if routing not in POLICIES:
        raise UsageError(f"routing must be one of {', '.join(POLICIES)}, got {routing!r}")
    engine_args.check()
    for spec in serve_args.tenants:
        parse_tenant(spec)
    source = open_model(engine_args.model)  # a bad model fails here, in one line, not N times in replica logs
    name = serve_args.served_model_name or default_model_name(source)
    source.close()
    started_serve = not _serve_running()  # else this replaces the running application
    if started_serve:  # (whose proxy holds the port)
        _check_port(serve_args.host, serve_args.port)
    # resolved here: a replica's environment is Ray's, not necessarily this process's ("" = no key)
    serve_args = replace(serve_args, api_key=api_key(serve_args) or "")
    cpus = machine_cpus()
    # every replica gets these engine_args whole: kv_remote_secret too (the CLI resolved $TIERLM_KV_REMOTE_SECRET
    # into it), so all of them seal and accept the shared tier's blocks with one secret
    engine_args = replace(engine_args, threads=engine_args.threads or max(1, cpus // replicas), progress=False)
    owns_ray = _start_ray(cpus)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": serve_args.host, "port": serve_args.port})
        engine = EngineReplica.options(
            num_replicas=replicas, ray_actor_options={"num_cpus": cpus / replicas},
            max_ongoing_requests=engine_args.max_num_seqs + serve_args.max_queue + REPLICA_SLACK,
            health_check_period_s=HEALTH_CHECK_PERIOD_S, graceful_shutdown_timeout_s=serve_args.drain_timeout,
            max_constructor_retry_count=1,  # a replica that cannot load the model fails deploy, not retries
            request_router_config=RequestRouterConfig(request_router_class=AffinityRouter,
                                                      request_router_kwargs={"policy": routing}),
        ).bind(engine_args, serve_args)
        ingress = Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
        serve.run(ingress.bind(engine, engine_args.model, engine_args.block_size,
                               allow_special_tokens_in_content=engine_args.allow_special_tokens_in_content),
                  name=APP, route_prefix="/")
    except BaseException as e:
        reason = _failure(APP) if isinstance(e, RuntimeError) else None  # Serve's "deploying ... failed"
        if owns_ray:
            ray.shutdown()  # Serve's actors with it (Serve's own shutdown would add a raylet warning here)
        elif started_serve:
            serve.shutdown()
        if reason is not None:
            raise TierlmError(f"a replica failed to start: {reason}") from e
        raise
    host = f"[{serve_args.host}]" if ":" in serve_args.host else serve_args.host
    return Cluster(f"http://{host}:{serve_args.port}", name, replicas, routing, owns_ray)


def shutdown() -> None:
    """Stop Serve and the local Ray instance (whoever started them)."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def serve_replicas(engine_args: EngineArgs, serve_args: ServeArgs, replicas: int, routing: str) -> int:
    """The CLI: deploy, print the URL, serve until SIGTERM/SIGINT, drain (new requests get 503, running ones get
    drain_timeout seconds; a second signal ends the wait), stop Serve and Ray; exit code 0."""
    # while deploying, SIGTERM interrupts like SIGINT: deploy stops what it started, the CLI exits 130
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cluster = deploy(engine_args, replicas, routing, serve_args)
    except SystemExit as e:  # SIGTERM while ray.init starts Ray (its handler exits; deploy cleaned up)
        raise KeyboardInterrupt from e
    print(f"serving {cluster.model_name} on {cluster.url}/v1 ({replicas} replicas on Ray Serve, {routing} routing)",
          flush=True)
    stop, now = threading.Event(), threading.Event()  # now: a second signal, stop draining

    def on_signal(signum, frame) -> None:
        (now if stop.is_set() else stop).set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        pass
    print(f"draining: new requests get 503; running ones have {serve_args.drain_timeout:.0f} s to finish",
          file=sys.stderr, flush=True)
    try:
        left = cluster.drain(serve_args.drain_timeout, now)
    except Exception as e:  # noqa: BLE001 - shut down all the same
        left = -1
        print(f"drain failed: {e}", file=sys.stderr, flush=True)
    if left > 0:
        print(f"stopping {left} requests still running", file=sys.stderr, flush=True)
    cluster.shutdown()
    return 0
