"""The adversarial suite's harness (tests/test_fuzz_api.py): the app and its engine loop served in this process
(schemathesis' ASGI transport: no socket, no port), the checks every response must pass, the bounds that keep a
generated request cheap, and whether the engine is back at rest afterwards. Imported explicitly.

Invariants a response must keep, whatever was sent: a 2xx, or a 4xx in OpenAI's error shape (never a 5xx);
within CALL_TIMEOUT_S; a stream read to its end ("data: [DONE]") with no error event in it."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

MODEL = "smol"  # the name the app serves
CALL_TIMEOUT_S = 30.0  # one call, streamed or whole: the transport raises (or cuts a stream) past it
SETTLE_S = 10.0  # after the last response: the engine's aborts and frees land within one step
SMALL_TOKENS = 4  # a generated request's max_tokens, unless it is one of the large ones
ERROR_KEYS = {"message", "type", "param", "code"}
REFERENCE = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


@dataclass
class Served:
    """The embedded model behind create_app, its loop stepping on a thread, and the app's schema (schemathesis)."""
    llm: Any
    loop: Any
    schema: Any
    reference: str = ""  # REFERENCE's greedy text before any fuzzing

    def op(self, path: str, method: str = "POST"):
        return self.schema[path][method]

    def send(self, case, **kwargs) -> tuple[int, bytes, float]:
        """(status, body, seconds) of one case; the call is bounded (a stream cut at the deadline fails)."""
        start = time.monotonic()
        r = case.call(timeout=CALL_TIMEOUT_S, **kwargs)
        took = time.monotonic() - start
        assert took < CALL_TIMEOUT_S and not r.stream_cut_short, f"no answer within {CALL_TIMEOUT_S} s"
        return r.status_code, r.content, took

    def post(self, path: str, body: dict | bytes) -> tuple[int, bytes]:
        """POST a JSON body, or raw bytes sent as they are (Content-Type: application/json either way)."""
        case = self.op(path).Case(body=body if isinstance(body, dict) else {}, media_type="application/json")
        status, content, _ = self.send(case, **({} if isinstance(body, dict) else {"data": body}))
        return status, content

    def greedy_text(self) -> str:
        status, content = self.post("/v1/completions", REFERENCE)
        assert status == 200, content
        return json.loads(content)["choices"][0]["text"]

    def assert_unharmed(self) -> None:
        """After a fuzz run: back at rest, and the reference request still gives the text it gave first."""
        assert self.unsettled() == []
        assert self.greedy_text() == self.reference

    def close(self) -> None:
        self.loop.stop()
        self.llm.close()

    def unsettled(self) -> list[str]:
        """What is not back at rest after SETTLE_S (empty: nothing unfinished, every KV block free, no step
        failed). Read from the test's thread: plain counters, the engine thread only ever lowers them to rest."""
        end = time.monotonic() + SETTLE_S
        while True:
            man = self.llm.kv.manager
            left = []
            if self.loop.num_unfinished:
                left.append(f"{self.loop.num_unfinished} requests unfinished")
            if man.num_free != man.num_blocks:
                left.append(f"{man.num_blocks - man.num_free} of {man.num_blocks} KV blocks still held")
            if self.loop.step_errors:
                left.append(f"{self.loop.step_errors} engine steps failed")
            if not left or time.monotonic() > end:
                return left
            time.sleep(0.05)


def serve(max_context: int, kv_memory: str, max_num_seqs: int) -> Served:
    import schemathesis
    from schemathesis.config import SchemathesisConfig

    from tierlm import LLM
    from tierlm.engine.args import EngineArgs
    from tierlm.serve.server import ServeArgs, engine_app, serve_engine_args

    # the server's own assembly (engine_app): its limits, guard and budget are fuzzed too
    llm = LLM.from_args(serve_engine_args(EngineArgs(progress=False, max_context=max_context, kv_memory=kv_memory,
                                                     max_num_seqs=max_num_seqs)))
    loop, app, _ = engine_app(llm, ServeArgs(max_queue=64, served_model_name=MODEL))
    loop.start()
    # An explicit config (no schemathesis.toml discovered from the working directory); streams are read to
    # their end (its default cuts them after 20 events, which is a client leaving, not a stream finishing).
    config = SchemathesisConfig.from_dict({"max-stream-events": 1_000_000, "request-timeout": CALL_TIMEOUT_S})
    served = Served(llm, loop, schemathesis.openapi.from_asgi("/openapi.json", app, config=config))
    served.reference = served.greedy_text()
    return served


def _number(v: Any) -> float | None:
    """v as pydantic's lax mode would read a number (ints, floats, numeric strings), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if not isinstance(v, int) or abs(v) < 1e300 else math.copysign(math.inf, v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def bound(body: Any, large: bool) -> Any:
    """A generated body made cheap to answer, in place: max_tokens (max_completion_tokens) at most SMALL_TOKENS,
    a missing one set to it (chat's default is 256), unless `large`: then one choice asking for far more tokens
    than the context holds (the engine stops it at the context's edge). Values that are not numbers are left
    alone: they are the generator's invalid input, answered 400."""
    if not isinstance(body, dict):
        return body
    for key in ("max_tokens", "max_completion_tokens"):
        if key not in body and key == "max_completion_tokens":
            continue
        v = _number(body.get(key, SMALL_TOKENS + 1))
        if large:
            body[key] = 10 ** 9
        elif v is not None and not v <= SMALL_TOKENS:  # NaN and inf too
            body[key] = SMALL_TOKENS
    if large:
        body["n"] = 1
    return body


def check(status: int, content: bytes) -> Any:
    """The invariants every response keeps; returns the parsed body (the stream's events for SSE)."""
    assert 200 <= status < 300 or 400 <= status < 500, f"{status}: {content[:500]!r}"
    if status >= 400:
        body = json.loads(content)
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, content[:500]
        e = body["error"]
        assert isinstance(e["message"], str) and e["message"] and isinstance(e["type"], str), e
        return body
    if content.startswith(b"data: "):
        return check_stream(content)
    body = json.loads(content)
    assert body["object"] in ("text_completion", "chat.completion"), body
    assert [c["index"] for c in body["choices"]] == list(range(len(body["choices"]))) and body["choices"]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"]), body["choices"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    return body


def check_stream(content: bytes) -> list[dict]:
    """Server-sent events read to the end: JSON chunks, no error event, each choice finished once, then [DONE]."""
    events = [e for e in content.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events[:3]
    assert events[-1] == "data: [DONE]", events[-3:]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("error" not in c for c in chunks), [c for c in chunks if "error" in c]
    finished = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"] is not None]
    assert finished and sorted(finished) == list(range(len(finished))), finished
    assert all(c["object"] in ("text_completion", "chat.completion.chunk") for c in chunks)
    return chunks
