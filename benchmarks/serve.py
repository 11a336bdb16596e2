"""Serving under load: `tierlm serve` vs llama-cpp-python's server on the same GGUF, same threads, in turn.

    .venv/bin/python benchmarks/serve.py --reps 2 --json out/serve.json          # embedded model, ~10 min

Method: each round starts each engine's server (fresh process, 127.0.0.1, a free port), waits for it,
warms it up with one request, runs every scenario, stops it; rounds alternate the engines. A scenario is
either closed-loop (C concurrent clients, each sending its next request when the last one finished) or
open-loop (Poisson arrivals at R requests/s, at most --max-in-flight at once); both are bounded by
--requests and --time-limit and only ever talk to 127.0.0.1. Every request is a chat completion with a
shared system prompt (a prefix cache helps both engines alike), a distinct question, temperature 0 and
min_tokens = max_tokens, so every answer is exactly --max-tokens tokens on both engines (the async openai
client, streaming). Columns: output tok/s over the scenario's wall time, TTFT and inter-token latency
percentiles over requests, errors. llama-cpp-python's server serves one request at a time (no batching
across requests in its Python server); it runs with --interrupt_requests False, so a new request queues
instead of cutting off the one streaming (its default, which ends that stream with no tokens).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import free_port, machine_info
from _common import start_server as start

SYSTEM = ("You are a concise assistant. Answer in plain English, in one or two sentences, without lists or "
          "markdown. If a question is ambiguous, answer its most common reading. ") * 3
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "What is a prime number?",
             "Who wrote Hamlet?", "What is photosynthesis?", "How far is the Moon?", "What is an atom?",
             "Why do we have seasons?", "What is gravity?", "What is a computer?", "Name a large ocean.",
             "What is rain made of?", "What do bees make?", "What is the speed of light?", "What is DNA?",
             "What is a volcano?"]


WORDS = ("river", "stone", "light", "music", "garden", "window", "paper", "cloud", "engine", "forest", "coffee",
         "market", "winter", "signal", "letter", "bridge")


def start_server(engine: str, a: argparse.Namespace, port: int) -> subprocess.Popen:
    if engine == "tierlm":
        cmd = [sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port), "--threads", str(a.threads),
               "--served-model-name", "m", "--max-context", str(a.context), "--max-num-seqs", str(a.max_num_seqs)]
        cmd += ["--model", a.model] if a.model else []
        cmd += a.tierlm_args.split()
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", a.model_path, "--port", str(port),
               "--host", "127.0.0.1", "--n_threads", str(a.threads), "--n_ctx", str(a.context),
               "--model_alias", "m", "--verbose", "False", "--interrupt_requests", "False"]
    return start(cmd, port, engine)


async def one(client, q: str, a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    stamps = []
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            max_tokens=a.max_tokens, temperature=0, stream=True, extra_body={"min_tokens": a.max_tokens})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
    except Exception as e:  # counted, not fatal: an overloaded server's errors are part of the result
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    if not stamps:
        return {"error": "no tokens"}
    gaps = [b - x for x, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - t0, "itl": statistics.mean(gaps) if gaps else 0.0, "tokens": len(stamps),
            "end": stamps[-1]}


async def scenario(port: int, kind: str, value: float, a: argparse.Namespace) -> dict:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=a.time_limit)
    rng = random.Random(0)
    filler = " ".join(f"{rng.choice(WORDS)}" for _ in range(a.prompt_words))  # a long, uncached context
    qs = [f"(request {i}) " + (f"Read this: {filler} {i}. " if a.prompt_words else "") + QUESTIONS[i % len(QUESTIONS)]
          for i in range(a.requests)]
    t0 = time.perf_counter()
    deadline = t0 + a.time_limit
    results: list[dict] = []
    if kind == "concurrency":
        it = iter(qs)

        async def worker():
            for q in it:
                if time.perf_counter() > deadline:
                    return
                results.append(await one(client, q, a))
        await asyncio.gather(*(worker() for _ in range(int(value))))
    else:  # Poisson arrivals at `value` requests/s
        sem = asyncio.Semaphore(a.max_in_flight)

        async def fire(q):
            async with sem:
                results.append(await one(client, q, a))
        tasks = []
        for q in qs:
            if time.perf_counter() > deadline:
                break
            tasks.append(asyncio.create_task(fire(q)))
            await asyncio.sleep(rng.expovariate(value))
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if "error" not in r]
    pct = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] if xs else None  # noqa: E731
    return {"kind": kind, "value": value, "requests": len(results), "errors": len(results) - len(ok),
            "error_samples": [r["error"] for r in results if "error" in r][:3], "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct([r["ttft"] for r in ok], 0.5), "ttft_p99": pct([r["ttft"] for r in ok], 0.99),
            "itl_p50": pct([r["itl"] for r in ok], 0.5), "itl_p99": pct([r["itl"] for r in ok], 0.99)}


def parse_scenarios(text: str) -> list[tuple[str, float]]:
    out = []
    for part in text.split(","):
        kind, _, v = part.partition("=")
        out.append(({"c": "concurrency", "rate": "rate"}[kind], float(v)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--engines", default="tierlm,llama.cpp")
    ap.add_argument("--scenarios", default="c=1,c=16,rate=2,rate=8",
                    help="c=N closed-loop clients, rate=R Poisson requests/s (comma list)")
    ap.add_argument("--requests", type=int, default=32, help="requests per scenario (bound)")
    ap.add_argument("--time-limit", type=float, default=240, help="seconds per scenario (bound)")
    ap.add_argument("--max-in-flight", type=int, default=32, help="open-loop: requests in flight at most")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=32, help="tierlm: requests decoded together")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prompt-words", type=int, default=0,
                    help="a distinct filler of N words before each question: long prompts that no cache serves")
    ap.add_argument("--tierlm-args", default="", help="extra `tierlm serve` flags, e.g. '--max-num-batched-tokens 1024'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1, help="rounds; engines alternate within each")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from tierlm.weights.embedded import embedded_model_path
    a.model_path = a.model or str(embedded_model_path())
    engines, scenarios = a.engines.split(","), parse_scenarios(a.scenarios)
    runs: list[dict] = []
    for rep in range(a.reps):
        for engine in engines:
            port = free_port()
            proc = start_server(engine, a, port)
            try:
                asyncio.run(scenario(port, "concurrency", 1, argparse.Namespace(**{**vars(a), "requests": 1})))
                for kind, value in scenarios:
                    r = asyncio.run(scenario(port, kind, value, a)) | {"engine": engine, "round": rep + 1}
                    runs.append(r)
                    print(f"round {rep + 1} {engine:9s} {kind}={value:g}: {r['tok_s']:6.1f} tok/s, TTFT p50/p99 "
                          f"{r['ttft_p50'] or 0:.2f}/{r['ttft_p99'] or 0:.2f} s, ITL p50/p99 {1e3 * (r['itl_p50'] or 0):.0f}/"
                          f"{1e3 * (r['itl_p99'] or 0):.0f} ms, {r['errors']} errors of {r['requests']}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    report(runs, engines, scenarios, a)


def report(runs: list[dict], engines: list[str], scenarios: list[tuple[str, float]], a) -> None:
    m = machine_info()
    print(f"\nmachine: {m['cpu']} | {m['cores']} cores | RAM {m['ram']} | {a.threads} threads | model "
          f"{Path(a.model_path).name} | {a.max_tokens} tokens per answer | medians over {a.reps} round(s)")
    print(f"{'scenario':<10}" + "".join(f"{e + ' tok/s':>16}{'TTFT p99':>10}{'ITL p50':>9}{'err':>5}" for e in engines)
          + f"{'tierlm/llama':>14}")
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    summary = {}
    for kind, value in scenarios:
        row, cells = {}, []
        for e in engines:
            rs = [r for r in runs if r["engine"] == e and r["kind"] == kind and r["value"] == value]
            row[e] = {k: med([r[k] for r in rs if r[k] is not None]) for k in ("tok_s", "ttft_p99", "itl_p50")}
            row[e]["errors"] = sum(r["errors"] for r in rs)
            cells.append(f"{row[e]['tok_s'] or 0:16.1f}{row[e]['ttft_p99'] or 0:10.2f}"
                         f"{1e3 * (row[e]['itl_p50'] or 0):9.0f}{row[e]['errors']:5d}")
        ratio = (row["tierlm"]["tok_s"] / row["llama.cpp"]["tok_s"]) if {"tierlm", "llama.cpp"} <= set(row) else None
        label = f"{'c' if kind == 'concurrency' else 'rate'}={value:g}"
        print(f"{label:<10}" + "".join(cells) + (f"{ratio:13.2f}x" if ratio else ""))
        summary[label] = row | {"tierlm_over_llama": ratio}
    if "tierlm" in engines and "c=1" in summary and "c=16" in summary:
        own = summary["c=16"]["tierlm"]["tok_s"] / summary["c=1"]["tierlm"]["tok_s"]
        print(f"tierlm throughput at 16 concurrent streams = {own:.2f}x its single-stream throughput")
        summary["tierlm_c16_over_c1"] = own
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"machine": m, "args": vars(a), "runs": runs, "summary": summary},
                                           indent=1, default=str))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
