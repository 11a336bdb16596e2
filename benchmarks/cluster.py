"""Two replicas on Ray Serve sharing a KV tier in Redis: a shared-prefix workload, with and without the Redis
tier, with random vs prefix-aware routing, and the Redis tier's put/get bandwidth for KV blocks.

    .venv/bin/python benchmarks/cluster.py --reps 1 --json out/cluster.json          # embedded model, ~10 min

Workload: --systems system prompts (~300 tokens each) x --users users, each a --turns-turn conversation (turn
k sends the system prompt, the earlier turns with the answers the server gave, and question k), greedy,
--max-tokens tokens each, --concurrency conversations at a time (async openai client, streaming, 127.0.0.1
only, bounded by the request count and --time-limit). A turn shares its system prompt with every user of that
system and its whole history with its own previous turn: what a prefix cache can reuse.

Configurations (each a fresh deployment of --replicas replicas of the same model on one local Ray instance, Redis
flushed; rounds alternate them): routing random / prefix (serve/router.py: affinity with bounded load), with and
without --kv-remote, and with a Redis link held to a remote host's network (cap_gbps/rtt_ms on the URL). Columns:
prefix hit rate (prompt tokens served from a cache, over all replicas' /metrics), KV blocks restored from Redis,
TTFT p50/p99, output tok/s over the run, errors.

Redis bandwidth: KV blocks of the real block size written (pipelined SETs through the tier's writer) and read
(MGET + verification, the restore path) through tierlm's RemoteTier, next to LMCache's published figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the redis-server helper

from _common import machine_info  # noqa: E402
from redis_server import RedisServer  # noqa: E402

WORDS = ("river", "stone", "light", "music", "garden", "window", "paper", "cloud", "engine", "forest", "coffee",
         "market", "winter", "signal", "letter", "bridge", "harbor", "planet", "silver", "meadow")
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "What is a prime number?", "Who wrote Hamlet?",
             "What is photosynthesis?", "How far is the Moon?", "What is an atom?", "Why do we have seasons?",
             "What is gravity?", "Name a large ocean.", "What do bees make?", "What is DNA?"]
# LMCache's published Redis figures (LMCache/lmcache_redis README, an H100 host, redis-server --io-threads 4):
# memtier_benchmark 4 MiB values GET 5.85 GB/s, SET 1.53 GB/s; redis-py as LMCache uses it, 32 MiB chunks, read
# 0.65 GB/s (pooled, concurrent), 0.45 GB/s (async); their zero-copy client 1.18 GB/s.
LMCACHE = {"memtier get": 5.85, "memtier set": 1.53, "redis-py read (LMCache)": 0.65, "zero-copy client": 1.18}


def system_prompt(i: int) -> str:
    rng = random.Random(i)
    return f"You are assistant {i}. House rules: " + " ".join(rng.choice(WORDS) for _ in range(260)) + "."


def conversations(a: argparse.Namespace) -> list[tuple[int, int]]:
    return [(s, u) for s in range(a.systems) for u in range(a.users)]


async def converse(client, s: int, u: int, a: argparse.Namespace, out: list, deadline: float) -> None:
    messages = [{"role": "system", "content": system_prompt(s)}]
    for turn in range(a.turns):
        if time.monotonic() > deadline:
            return
        messages.append({"role": "user", "content": f"(user {u}) {QUESTIONS[(u + 3 * turn) % len(QUESTIONS)]}"})
        t0, ttft, text, err = time.perf_counter(), None, [], None
        try:
            stream = await client.chat.completions.create(model="m", messages=messages, max_tokens=a.max_tokens,
                                                          temperature=0.0, stream=True, timeout=120)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(chunk.choices[0].delta.content)
        except Exception as e:  # noqa: BLE001 - counted, the run goes on
            err = type(e).__name__
        out.append({"ttft": ttft, "tokens": a.max_tokens if err is None else 0, "error": err})
        messages.append({"role": "assistant", "content": "".join(text)})


async def workload(url: str, a: argparse.Namespace) -> tuple[list, float]:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    convs = conversations(a)
    random.Random(7).shuffle(convs)
    out: list = []
    sem = asyncio.Semaphore(a.concurrency)
    deadline = time.monotonic() + a.time_limit

    async def run(s: int, u: int) -> None:
        async with sem:
            await converse(client, s, u, a, out, deadline)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(s, u) for s, u in convs))
    wall = time.perf_counter() - t0
    await client.close()
    return out, wall


def scrape(url: str, replica: str) -> dict[str, float]:
    """One replica's counters (the ingress serves /metrics from the replica the header names)."""
    from prometheus_client.parser import text_string_to_metric_families
    from tierlm.serve.relay import REPLICA_HEADER
    req = urllib.request.Request(url + "/metrics", headers={REPLICA_HEADER: replica})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    got: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            label = smp.labels.get("move") or smp.labels.get("op") or ""
            got[smp.name + (f"[{label}]" if label else "")] = smp.value
    return got


def totals(url: str, replicas: list[str]) -> dict[str, float]:
    keys = ("tierlm:prefix_cache_queries_total", "tierlm:prefix_cache_hits_total",
            "tierlm:kv_tier_moves_total[remote_restores]", "tierlm:kv_remote_blocks_total[written]")
    per = [scrape(url, r) for r in replicas]
    return {k: sum(p.get(k, 0.0) for p in per) for k in keys}


def run_config(name: str, routing: str, remote: str | None, a: argparse.Namespace, redis_url: str) -> dict:
    import redis
    from tierlm.engine.args import EngineArgs
    from tierlm.serve.cluster import deploy
    from tierlm.serve.server import ServeArgs

    redis.Redis.from_url(redis_url).flushall()
    args = EngineArgs(model=a.model, kv_remote=remote, threads=a.threads, max_context=a.context)
    cluster = deploy(args, replicas=a.replicas, routing=routing,
                     serve_args=ServeArgs(port=a.port, served_model_name="m"))
    try:
        ids = cluster.replica_ids()
        out, wall = asyncio.run(workload(cluster.url, a))
        m = totals(cluster.url, ids)
    finally:
        cluster.shutdown()
    ttfts = sorted(r["ttft"] for r in out if r["ttft"] is not None)
    q = m["tierlm:prefix_cache_queries_total"]
    row = {"config": name, "routing": routing, "remote": remote, "requests": len(out),
           "errors": sum(r["error"] is not None for r in out),
           "hit_rate": m["tierlm:prefix_cache_hits_total"] / q if q else 0.0,
           "remote_restores": m["tierlm:kv_tier_moves_total[remote_restores]"],
           "remote_written": m["tierlm:kv_remote_blocks_total[written]"],
           "ttft_p50": statistics.median(ttfts) if ttfts else None,
           "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
           "tok_s": sum(r["tokens"] for r in out) / wall, "wall_s": wall}
    print(f"  {name:<28} hit {row['hit_rate']:6.1%}  redis restores {row['remote_restores']:5.0f}  "
          f"TTFT p50 {row['ttft_p50'] or 0:6.3f} s p99 {row['ttft_p99'] or 0:6.3f} s  {row['tok_s']:6.1f} tok/s  "
          f"errors {row['errors']}" + (f" ({next(r['error'] for r in out if r['error'])})" if row["errors"] else ""),
          flush=True)
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per configuration (in run order), the median of each column over the rounds."""
    names = list(dict.fromkeys(r["config"] for r in rows))
    cols = ("hit_rate", "remote_restores", "ttft_p50", "ttft_p99", "tok_s")
    return [{"config": n, "rounds": sum(r["config"] == n for r in rows),
             **{c: statistics.median(r[c] for r in rows if r["config"] == n and r[c] is not None) for c in cols}}
            for n in names]


def redis_bandwidth(url: str, a: argparse.Namespace) -> list[dict]:
    """Put/get GB/s of KV blocks through RemoteTier (encode + pipelined SETs; MGET + verify)."""
    import os

    from tierlm.kvcache.block_file import StoredBlock
    from tierlm.kvcache.remote_tier import RemoteTier

    rows = []
    for label, nbytes in (("embedded fp32 block (16 tok)", 737_280), ("7B bf16 block (16 tok)", 8 << 20)):
        count = max(4, (a.bandwidth_mb << 20) // nbytes)
        tier = RemoteTier(url, "bench", "float32", b"bench-salt", "none", nbytes)
        blocks = [StoredBlock(os.urandom(16), b"\0" * 16, tuple(range(16)), os.urandom(nbytes)) for _ in range(count)]
        t0 = time.perf_counter()
        for b in blocks:
            tier.put(b)
        tier.flush()
        put_s = time.perf_counter() - t0
        wanted = [(b.hash, b.tokens) for b in blocks]
        t0 = time.perf_counter()
        got = tier.get_many(wanted)
        get_s = time.perf_counter() - t0
        ok = sum(g is not None for g in got)
        tier.close()
        total = count * nbytes
        rows.append({"block": label, "blocks": count, "put_gbps": total / put_s / 1e9, "get_gbps": total / get_s / 1e9,
                     "verified": ok, "dropped": tier.counters.dropped_puts, "rtt_ms": tier.rtt_s * 1e3})
        r = rows[-1]
        print(f"  {label:<30} {count:4d} blocks  put {r['put_gbps']:.2f} GB/s  get {r['get_gbps']:.2f} GB/s  "
              f"(verified {ok}/{count}, rtt {r['rtt_ms']:.2f} ms)", flush=True)
    return rows


def pair(a: argparse.Namespace, url: str) -> list[dict]:
    """Two engines (no Ray) on one model and one Redis: A computes a --pair-tokens prompt cold, B (a fresh engine,
    as another replica) gets it from Redis; then B again over the simulated link. At real shapes (7B) too."""
    import gc

    import redis
    from tierlm import LLM, SamplingParams

    words = " ".join(random.Random(3).choice(WORDS) for _ in range(4 * a.pair_tokens))
    rows, greedy = [], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    redis.Redis.from_url(url).flushall()
    for role, remote in (("A cold (computes, writes through)", url), ("B from Redis", url),
                         (f"B from Redis @ {a.sim}", f"{url}?{a.sim}")):
        llm = LLM(a.model, kv_remote=remote, threads=a.pair_threads, progress=False, max_context=a.context)
        ids = llm.tokenizer.encode(words)[:a.pair_tokens]
        out = llm.generate([ids], greedy)[0]
        llm.kv.tiers.flush()
        r = llm.kv.tiers.remote
        rows.append({"engine": role, "prompt_tokens": len(ids), "ttft_s": out.metrics.ttft_s,
                     "restored_tokens": llm.kv.restored_tokens, "get_mb": r.counters.get_bytes / 1e6,
                     "put_mb": r.counters.put_bytes / 1e6, "rtt_ms": r.rtt_s * 1e3, "gbps": r.gbps,
                     "block_mb": llm.kv.pool.block_bytes / 1e6, "tokens": out.token_ids})
        x = rows[-1]
        print(f"  {role:<34} TTFT {x['ttft_s']:7.3f} s  restored {x['restored_tokens']:5d} tokens  "
              f"get {x['get_mb']:7.1f} MB  put {x['put_mb']:7.1f} MB  link {x['gbps']:.2f} GB/s rtt {x['rtt_ms']:.2f} ms",
              flush=True)
        llm.close()
        del llm
        gc.collect()
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
    print(f"  TTFT from Redis / cold: {rows[1]['ttft_s'] / rows[0]['ttft_s']:.3f}; over the simulated link "
          f"{rows[2]['ttft_s'] / rows[0]['ttft_s']:.3f}; outputs identical: {same}")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per replica")
    p.add_argument("--systems", type=int, default=3)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=300, help="seconds per configuration")
    p.add_argument("--port", type=int, default=8911)
    p.add_argument("--bandwidth-mb", type=int, default=256, help="MiB of blocks per bandwidth measurement")
    p.add_argument("--sim", default="cap_gbps=0.125&rtt_ms=0.2", help="the simulated remote link (1 GbE)")
    p.add_argument("--pair", action="store_true", help="only two engines sharing Redis, no Ray (e.g. a 7B file)")
    p.add_argument("--pair-tokens", type=int, default=512)
    p.add_argument("--pair-threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import ray
    from tierlm.serve import cluster as cl

    print(machine_info())
    results: dict = {"args": vars(a), "machine": machine_info(), "configs": [], "bandwidth": []}
    with RedisServer(maxmemory="2gb") as redis_srv:
        url = redis_srv.url
        if a.pair:
            results["pair"] = pair(a, url)
            if a.json:
                Path(a.json).write_text(json.dumps(results, indent=1))
            return 0
        print("Redis KV block bandwidth (tierlm RemoteTier, redis-py, one client, 127.0.0.1):")
        results["bandwidth"] = redis_bandwidth(url, a)
        print("  LMCache's published figures (GB/s): " + ", ".join(f"{k} {v}" for k, v in LMCACHE.items()))
        configs = [("random, no Redis", "random", None), ("prefix, no Redis", "prefix", None),
                   ("random + Redis", "random", url), ("prefix + Redis", "prefix", url),
                   (f"random + Redis @ {a.sim}", "random", f"{url}?{a.sim}")]
        cl._start_ray(cl.machine_cpus())  # one Ray instance for every deployment
        try:
            for rep in range(a.reps):
                print(f"round {rep + 1}/{a.reps}: {len(conversations(a))} conversations x {a.turns} turns, "
                      f"{a.concurrency} at a time, {a.replicas} replicas", flush=True)
                for name, routing, remote in configs:
                    results["configs"].append(run_config(name, routing, remote, a, url))
        finally:
            ray.shutdown()
    summary = summarize(results["configs"])
    results["summary"] = summary
    print("medians over rounds (ratios against random routing without Redis):")
    ref = summary[0]
    for r in summary:
        print(f"  {r['config']:<28} hit {r['hit_rate']:6.1%}  redis restores {r['remote_restores']:5.0f}  "
              f"TTFT p50 {r['ttft_p50']:6.3f} s ({ref['ttft_p50'] / r['ttft_p50']:.2f}x)  p99 {r['ttft_p99']:6.3f} s  "
              f"{r['tok_s']:6.1f} tok/s ({r['tok_s'] / ref['tok_s']:.2f}x)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
