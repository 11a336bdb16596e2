"""`tierlm serve --replicas 2` on Ray Serve, through the Python entry (serve/cluster.py), with the openai
client against the one endpoint on 127.0.0.1: answers equal one process's greedy answers, streamed and not;
a shared prefix keeps its replica (its prefix cache serves it) while distinct prefixes and a hot prefix's
burst spread; a client that leaves aborts its request on the replica; a replica killed mid-stream fails that
stream cleanly, the other serves on, Serve restarts it; with the shared Redis KV tier, a prefix computed on
one replica is a hit on the other; draining lets running streams finish and refuses new requests.

One Ray instance and one deployment (2 replicas of the embedded model, 1 thread each) for the module; the
shared-tier test redeploys it with kv_remote; the drain test comes last. Every wait is bounded; Ray is shut
down at teardown.
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from serve_helpers import free_port

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from tierlm.engine.args import EngineArgs  # noqa: E402
from tierlm.serve.relay import REPLICA_HEADER  # noqa: E402
from tierlm.serve.server import ServeArgs  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smol"
ENGINE = EngineArgs(model=None, threads=1, max_num_seqs=16)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
WORDS = ("river stone lantern copper meadow harbor violet engine quiet thunder maple signal orbit canvas ember "
         "glacier saddle prism willow anchor falcon cedar marble pepper tunnel velvet summit ribbon comet").split()


@pytest.fixture(scope="module")
def cluster(redis_server):
    """Two replicas sharing the session's Redis as their KV tier (one deployment for the whole file), with a
    secret: a hit on the other replica means both got it (each refuses values sealed with another)."""
    from tierlm.serve.cluster import deploy
    c = deploy(replace(ENGINE, kv_remote=redis_server.url, kv_remote_secret="shared by the replicas"), replicas=2,
               routing="prefix",
               serve_args=ServeArgs(port=free_port(), drain_timeout=5, served_model_name=MODEL))
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _document(seed: int, words: int = 90) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _ask(client, content: str, max_tokens: int = 1, **kw) -> tuple[str, object]:
    """(the replica that served, the completion)."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, **kw)
    return raw.headers[REPLICA_HEADER], raw.parse()


def test_answers_equal_one_process(cluster, client):
    from tierlm import LLM, SamplingParams
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES,
                                                           max_tokens=24, temperature=0)
    whole = raw.parse()
    streamed = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24,
                                              temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    with LLM(threads=1, progress=False) as llm:
        want = llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=24))
    assert whole.choices[0].message.content == text == want.text and "Paris" in want.text
    assert whole.usage.completion_tokens == len(want.token_ids)
    assert raw.headers[REPLICA_HEADER] in cluster.replica_ids()
    with pytest.raises(openai.NotFoundError):  # the replica's own errors, unchanged
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=1)
    assert [m.id for m in client.models.list()] == [MODEL] == [cluster.model_name]


def test_shared_prefix_keeps_its_replica_and_its_cache(client):
    doc = _document(1)
    served = [_ask(client, f"{doc}\n\nQuestion {q}: which word comes first?") for q in range(4)]
    assert len({rid for rid, _ in served}) == 1, served
    # the replica that computed the document's blocks serves them from its prefix cache
    assert all(r.usage.prompt_tokens_details.cached_tokens >= 64 for _, r in served[1:])


def test_distinct_prefixes_spread_over_both_replicas(cluster, client):
    replicas = {_ask(client, _document(100 + i, words=60))[0] for i in range(16)}
    assert replicas == set(cluster.replica_ids())  # all on one: 2^-15 if the ring splits keys evenly, 0.6^16 at 60:40


def test_a_hot_prefix_burst_spills_onto_the_other_replica(cluster, client):
    doc = _document(7)
    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda q: _ask(client, f"{doc}\n\nQuestion {q}?", max_tokens=32,
                                              extra_body={"ignore_eos": True})[0], range(6)))
    assert set(served) == set(cluster.replica_ids()), served  # bounded load: at most ceil(1.25 * (m+1) / 2)


def _served_by(client, replica_id: str) -> bool:
    try:
        return _ask(client, "hello", extra_headers={REPLICA_HEADER: replica_id})[0] == replica_id
    except openai.APIError:
        return False


def test_a_replica_killed_mid_stream(cluster, client):
    import ray
    with client.with_options(timeout=30).chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}], max_tokens=2000,
            temperature=0, stream=True, extra_body={"ignore_eos": True}) as resp:
        victim = resp.headers[REPLICA_HEADER]
        chunks, outcome = 0, "complete"
        start = time.monotonic()
        try:
            for _ in resp.parse():
                chunks += 1
                if chunks == 5:
                    ray.kill(cluster.replica_actor(victim), no_restart=True)
                    start = time.monotonic()
        except Exception as e:  # noqa: BLE001 - an error event (openai.APIError) or a dropped connection
            outcome = type(e).__name__
    assert chunks >= 5 and outcome != "complete", "the stream outlived its replica"
    assert time.monotonic() - start < 15, "the client waited on a dead replica"
    survivors = [_ask(client, f"{_document(200 + i)} After the kill {i}.")[0] for i in range(3)]
    assert victim not in survivors
    end = time.monotonic() + 60  # Serve notices (health checks every 2 s) and starts a replacement
    while True:
        fresh = [r for r in cluster.replica_ids() if r != victim and r not in survivors]
        if fresh and _served_by(client, fresh[0]) and victim not in cluster.replica_ids():
            break
        assert time.monotonic() < end, f"no replacement serves yet: {cluster.replica_ids()}"
        time.sleep(0.5)


def _health(cluster, replica_id: str) -> dict:
    req = urllib.request.Request(cluster.url + "/health", headers={REPLICA_HEADER: replica_id})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers[REPLICA_HEADER] == replica_id
        return json.loads(r.read())


def test_a_client_that_leaves_aborts_its_request_on_the_replica(cluster):
    url = urllib.parse.urlsplit(cluster.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "Once upon a time", "stream": True,
                                                        "max_tokens": 2000, "ignore_eos": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    replica = resp.headers[REPLICA_HEADER]
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    end = time.monotonic() + 10
    while _health(cluster, replica)["running"] != 1:  # the snapshot /health reads is refreshed every 0.25 s
        assert time.monotonic() < end
        time.sleep(0.1)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    end = time.monotonic() + 10
    while _health(cluster, replica)["running"] != 0:
        assert time.monotonic() < end, "the replica still generates for a client that left"
        time.sleep(0.1)


def _ttft(client, ids: list[int], replica_id: str) -> tuple[float, str]:
    """Seconds to the first streamed token of a completion of token ids on one replica, and the text."""
    start, first, text = time.monotonic(), None, ""
    for chunk in client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, stream=True,
                                           extra_headers={REPLICA_HEADER: replica_id}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.monotonic() - start
        text += chunk.choices[0].text if chunk.choices else ""
    assert first is not None
    return first, text


def test_a_prefix_computed_on_one_replica_is_a_hit_on_the_other(cluster, client, redis_url):
    import redis

    end = time.monotonic() + 60  # a replica killed by an earlier test may still be coming back
    while len(ids := cluster.replica_ids()) != 2 or not all(_served_by(client, r) for r in ids):
        assert time.monotonic() < end, f"replicas: {cluster.replica_ids()}"
        time.sleep(0.5)
    a, b = ids
    prompt = random.Random(time.time_ns()).choices(range(1000, 30000), k=500)
    cold, cold_text = _ttft(client, prompt, a)
    store = redis.Redis.from_url(redis_url)
    end, keys = time.monotonic() + 10, -1
    while keys != (keys := store.dbsize()) or keys == 0:  # the write-through queue has drained
        assert time.monotonic() < end, "no block reached the shared tier"
        time.sleep(0.3)
    warm, warm_text = _ttft(client, prompt, b)
    assert warm <= 0.2 * cold, f"TTFT on the other replica {warm:.3f} s vs cold {cold:.3f} s ({keys} keys)"
    assert warm_text == cold_text


def test_draining_finishes_running_streams_and_refuses_new_requests(cluster, client):
    """Last: the deployment refuses work from here on (the CLI's SIGTERM path, then shutdown)."""
    first, done, text = threading.Event(), {}, []

    def stream() -> None:
        for chunk in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=80, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):
            text.append(chunk.choices[0].text)
            first.set()
            done["reason"] = chunk.choices[0].finish_reason or done.get("reason")

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream)
        assert first.wait(30)
        draining = pool.submit(cluster.drain, 60)
        time.sleep(0.5)
        with pytest.raises(openai.APIStatusError) as refused:
            _ask(client, "Too late?")
        assert refused.value.status_code == 503 and refused.value.code == "draining"
        assert not draining.done()  # waiting for the stream
        running.result(timeout=60)
        assert draining.result(timeout=10) == 0
    assert done["reason"] == "length" and len(text) >= 80
