"""A live `tierlm serve` on 127.0.0.1 for the server tests: started on a free port in a subprocess, waited
for through /health, stopped (SIGTERM, then SIGKILL) after. Plain functions, imported explicitly."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(*args: str, wrap: tuple[str, ...] = ()) -> Server:
    """wrap: a command line that runs the server's (a memory cgroup's MemoryCgroup.wrap prefix)."""
    port = free_port()
    argv = [sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(list(wrap) + argv if wrap else argv,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(proc, port)
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"tierlm serve exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if get(server, "/health")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError("tierlm serve did not become healthy in time")


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body or {"raw": text}, headers) of one plain HTTP request."""
    req = urllib.request.Request(server.url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw, hdrs = r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read().decode(), dict(e.headers)
    try:
        return status, json.loads(raw), hdrs
    except json.JSONDecodeError:
        return status, {"raw": raw}, hdrs


def get(server: Server, path: str) -> tuple[int, dict]:
    status, body, _ = request(server, "GET", path)
    return status, body


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of /metrics, parsed with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    text = request(server, "GET", "/metrics")[1]["raw"]
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def settles(ok, timeout: float = 10.0) -> bool:
    """ok() becomes true within `timeout` (the server's state snapshot is refreshed every 0.25-0.5 s)."""
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True
