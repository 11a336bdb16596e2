"""No input can make the server hold more than it planned, or hang (issue 23): bodies bounded before they are read
(413), request memory shared by a budget (503 past it), slow clients timed out (408, connections closed), texts
far past the context refused before they are tokenised, requests at the context's edge finish or are refused;
and under a memory cgroup, bodies of 50 MiB cost a 413, not the process."""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import get, metric, request, start

pytestmark = pytest.mark.slow
CONTEXT = 64
MAX_BODY = 32 << 10


@pytest.fixture(scope="module")
def server():
    # request memory for three bodies of MAX_BODY at once (17x each: guard.PARSE_FACTOR), slow clients cut short
    s = start("--max-context", str(CONTEXT), "--max-body-bytes", str(MAX_BODY), "--request-memory",
              str(3 * 17 * MAX_BODY), "--body-timeout", "2", "--header-timeout", "2")
    yield s
    s.stop()


def _open(server, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(head)
    return s


def _post_head(length: int | None, path: str = "/v1/completions") -> bytes:
    size = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    return b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + size + b"\r\n"


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        if not (chunk := sock.recv(4096)):
            return 0  # closed without an answer
        data += chunk
    return int(data.split(b" ")[1])


def test_a_body_past_the_limit_is_refused_before_it_is_read(server):
    s = _open(server, _post_head(50 << 20))  # says 50 MiB, sends none of it
    assert _status(s) == 413
    s.close()
    s = _open(server, _post_head(None))  # chunked, no length: read up to the limit, refused there
    chunk = b"x" * (8 << 10)
    for _ in range(MAX_BODY // len(chunk) + 2):
        s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    assert _status(s) == 413
    s.close()


def test_request_memory_is_a_budget_and_slow_bodies_time_out(server):
    """Three slow bodies of MAX_BODY hold all the request memory: a fourth gets 503 at once; after the body
    timeout the slow ones get 408 and the memory is back."""
    slow = [_open(server, _post_head(MAX_BODY) + b'{"prompt": "') for _ in range(3)]
    time.sleep(0.3)
    s = _open(server, _post_head(1000))
    assert _status(s) == 503
    s.close()
    t0 = time.monotonic()
    assert [_status(x) for x in slow] == [408] * 3 and time.monotonic() - t0 < 5
    for x in slow:
        x.close()
    assert metric(server, "tierlm:request_memory_used_bytes") == 0
    assert metric(server, "tierlm:request_memory_refusals_total") >= 1


def test_a_connection_that_never_finishes_its_headers_is_closed(server):
    s = _open(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # ... and nothing more
    t0 = time.monotonic()
    assert s.recv(100) == b"" and time.monotonic() - t0 < 5  # closed by the server after --header-timeout
    s.close()


def test_a_text_far_past_the_context_is_refused_before_tokenising(server):
    body = json.dumps({"prompt": "word " * 6000, "max_tokens": 1}).encode()  # 30 kB: ~6000 tokens, context 64
    status, out, _ = request(server, "POST", "/v1/completions", body)
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 3000}).encode()
    status, out, _ = request(server, "POST", "/v1/chat/completions", body)
    assert status == 413  # 3000 messages: more body than a context of 64 needs


def _complete(server, ids: list[int], max_tokens: int | None, stream: bool) -> tuple[int, str]:
    body = {"prompt": ids, "temperature": 0, "ignore_eos": True, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    status, out, _ = request(server, "POST", "/v1/completions", json.dumps(body).encode())
    if status != 200:
        return status, out["error"]["code"] or out["error"]["type"]
    if not stream:
        return status, out["choices"][0]["finish_reason"]
    events = [json.loads(line[6:]) for line in out["raw"].splitlines() if line.startswith("data: {")]
    return status, next(e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"])


@pytest.mark.parametrize("stream", [False, True])
def test_requests_at_the_context_edge_finish_or_are_refused(server, stream):
    """context-1 tokens: one token fits, whatever max_tokens asks ("length"); context and context+1: 400; and
    several at the edge at once (each needs the whole pool: they take turns) all finish, the pool empty after."""
    for n, want in ((CONTEXT - 1, (200, "length")), (CONTEXT, (400, None)), (CONTEXT + 1, (400, None))):
        for max_tokens in (1, 4, None):
            status, what = _complete(server, list(range(10, 10 + n)), max_tokens, stream)
            assert status == want[0] and (want[1] is None or what == want[1]), (n, max_tokens, status, what)
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        _complete(server, list(range(20 + i, 20 + i + CONTEXT - 1)), 8, stream))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [(200, "length")] * 4
    assert metric(server, "tierlm:kv_blocks", state="used") == 0 and get(server, "/health")[1]["running"] == 0


def test_fifty_mib_bodies_cost_a_413_not_the_process_under_a_memory_cgroup(tmp_path):
    """The issue's case: inside a 640 MiB memory cgroup, two 50 MiB bodies at once got the server OOM-killed."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._cgroup import MemoryCgroup, unavailable_reason
    if (why := unavailable_reason()) is not None:
        pytest.skip(f"no memory cgroup: {why}")
    cg = MemoryCgroup.create(640 << 20, name=f"tierlm-test-{time.time_ns()}")
    try:
        server = start(wrap=tuple(cg.wrap(["true"])[:-1]))  # sh -c '... exec "$@"' sh <the server's argv>
        try:
            payload = b'{"prompt": "' + b"a" * (50 << 20) + b'"}'

            def send(chunked: bool) -> int:
                s = _open(server, _post_head(None if chunked else len(payload)))
                try:
                    if chunked:
                        for i in range(0, len(payload), 1 << 20):
                            part = payload[i:i + (1 << 20)]
                            s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
                    else:
                        s.sendall(payload)
                except OSError:
                    pass  # the server answered and closed while we were still sending
                status = _status(s)
                s.close()
                return status
            codes = []
            threads = [threading.Thread(target=lambda c=c: codes.append(send(c))) for c in (False, True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert sorted(codes) == [413, 413]
            assert server.proc.poll() is None and cg.oom_kills() in (0, None)
            status, out, _ = request(server, "POST", "/v1/completions",
                                     json.dumps({"prompt": "The sea is", "max_tokens": 4}).encode())
            assert status == 200 and out["choices"][0]["text"]
            assert cg.peak_bytes() < 640 << 20
        finally:
            assert server.stop() == 0
    finally:
        cg.remove()
