"""Memory pressure: `tierlm serve` in a memory cgroup under load ramped past what it holds, with layer
migration (--migrate) and with the planner's fixed placement, the same load in turn.

    .venv/bin/python benchmarks/pressure.py --json /work/pressure.json                  # embedded model, ~10 min
    .venv/bin/python benchmarks/pressure.py --model /work/models/llama-7b-q4_1.gguf --cap 4GiB --budget 3300MiB \
        --offload-dir /work/off --ramp 1,2,4,8 --stage-s 90 --max-tokens 16

Per run (configs alternated over --reps): a fresh server in a fresh v1 memory cgroup (--cap, page cache charged;
without root: no cgroup, --max-memory alone), `--max-memory cpu=BUDGET --offload-dir`, the KV pool the
planner chose. Load: closed-loop stages of C concurrent clients (--ramp), --stage-s each; every request is a
distinct raw completion whose first words differ (no prefix-cache hit: its output must equal a solo run token
for token), greedy, --max-tokens with min_tokens equal. /metrics is sampled every second. Afterwards a server
without budget or cgroup runs every completed prompt alone, and each output is compared.
Reported per config: completed, 429, 503, lost (accepted, never finished), wrong (differs from solo), TTFT
p50/p99, output tok/s, most requests running at once and that per GB of cap, peak cgroup memory, OOM kills,
whether the server lived, migrations. Only 127.0.0.1; bounded by the stages; the servers are stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from _cgroup import MemoryCgroup, unavailable_reason
from _common import free_port, machine_info, scrape_metrics, start_server

from tierlm.config import parse_size

WORDS = ("river stone light music garden window paper cloud engine forest coffee market winter signal letter "
         "bridge orange pencil mirror silver planet ladder candle rocket").split()


def prompt(i: int, words: int) -> str:
    r = random.Random(i)
    return f"Note {i}: " + " ".join(r.choice(WORDS) for _ in range(words)) + ". In short,"


async def one(client, i: int, a) -> dict:
    import openai
    t0, first, text = time.perf_counter(), None, []
    try:
        stream = await client.completions.create(model="m", prompt=prompt(i, a.prompt_words), max_tokens=a.max_tokens,
                                                 temperature=0, stream=True, extra_body={"min_tokens": a.max_tokens})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].text)
    except openai.APIStatusError as e:
        return {"i": i, "status": e.status_code}
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        return {"i": i, "status": "lost", "error": str(e)[:120]}
    return {"i": i, "status": 200, "text": "".join(text), "ttft": (first or time.perf_counter()) - t0,
            "end": time.perf_counter()}


async def ramp(port: int, a) -> list[dict]:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=a.timeout)
    counter, results = iter(range(10**9)), []
    for c in a.ramp:
        end = time.perf_counter() + a.stage_s

        async def worker():
            while time.perf_counter() < end:
                r = await one(client, next(counter), a)
                r["stage"] = c
                results.append(r)
                if r["status"] in (429, 503):
                    await asyncio.sleep(0.5)  # what a client told Retry-After would do
        await asyncio.gather(*(worker() for _ in range(c)))
    await client.close()
    return results


def serve_cmd(a, port: int, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port), "--threads", str(a.threads),
           "--served-model-name", "m", "--max-num-seqs", str(a.max_num_seqs), "--max-queue", str(a.max_queue)]
    return cmd + (["--model", a.model] if a.model else []) + extra


def run_config(a, config: str, run: int) -> dict:
    port = free_port()
    kv_dir = Path(a.offload_dir) / f"kv-run{run}"  # a fresh KV spill tier per run: no hits from an earlier run
    shutil.rmtree(kv_dir, ignore_errors=True)
    extra = ["--max-memory", f"cpu={a.budget}", "--offload-dir", a.offload_dir, "--max-context", str(a.context),
             "--kv-offload-dir", str(kv_dir)]
    extra += ["--migrate"] if config == "migrate" else []
    extra += a.tierlm_args.split()
    cg = None if unavailable_reason() else MemoryCgroup.create(parse_size(a.cap), f"tierlm-pressure-{config}")
    cmd = serve_cmd(a, port, extra)
    proc = start_server(cg.wrap(cmd) if cg else cmd, port, f"tierlm ({config})", timeout_s=900)
    samples, stop = [], threading.Event()

    def sampler():
        while not stop.wait(1.0):
            try:
                samples.append(scrape_metrics(port))
            except OSError:
                pass
    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    t0 = time.perf_counter()
    results = asyncio.run(ramp(port, a))
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    shutil.rmtree(kv_dir, ignore_errors=True)
    out = {"config": config, "results": results, "wall_s": wall, "alive_at_end": alive, "exit_code": rc,
           "samples": samples}
    if cg is not None:
        out |= {"cap": cg.limit_bytes(), "peak_bytes": cg.peak_bytes(), "oom_kills": cg.oom_kills()}
        cg.remove()
    return out


def references(a, prompts: list[int]) -> dict[int, str]:
    """Every prompt alone on a server with no budget and no cgroup (same numerics: the same stored weights)."""
    port = free_port()
    proc = start_server(serve_cmd(a, port, ["--max-context", str(a.context), "--no-prefix-cache"]), port,
                        "tierlm (reference)", timeout_s=900)
    try:
        async def solo():
            from openai import AsyncOpenAI
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=a.timeout)
            out = {i: (await one(client, i, a)).get("text") for i in prompts}
            await client.close()
            return out
        return asyncio.run(solo())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def summarise(run: dict, ref: dict[int, str], cap: int) -> dict:
    res = run["results"]
    ok = [r for r in res if r["status"] == 200]
    pct = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] if xs else None  # noqa: E731
    running = max((s.get("tierlm:num_requests_running", 0) for s in run["samples"]), default=0)
    last = run["samples"][-1] if run["samples"] else {}
    return {"config": run["config"], "requests": len(res), "completed": len(ok),
            "http_429": sum(r["status"] == 429 for r in res), "http_503": sum(r["status"] == 503 for r in res),
            "lost": sum(r["status"] == "lost" for r in res),
            "other": sum(r["status"] not in (200, 429, 503, "lost") for r in res),
            "wrong": sum(ref.get(r["i"]) != r["text"] for r in ok),
            "ttft_p50": pct([r["ttft"] for r in ok], 0.5), "ttft_p99": pct([r["ttft"] for r in ok], 0.99),
            "tok_s": len(ok) * run["args_max_tokens"] / run["wall_s"], "max_running": running,
            "running_per_gib": running / (cap / 2**30),
            "max_kv_blocks": max((s.get('tierlm:kv_blocks{state="used"}', 0) + s.get('tierlm:kv_blocks{state="cached"}', 0)
                                  + s.get('tierlm:kv_blocks{state="free"}', 0) for s in run["samples"]), default=0),
            "min_resident_layers": min((s.get("tierlm:resident_layers", 0) for s in run["samples"]), default=0),
            "demotions": last.get('tierlm:layer_migrations_total{direction="demote"}', 0),
            "promotions": last.get('tierlm:layer_migrations_total{direction="promote"}', 0),
            "max_pressure": max((s.get("tierlm:memory_pressure_level", 0) for s in run["samples"]), default=0),
            "peak_mib": run.get("peak_bytes", 0) / 2**20, "oom_kills": run.get("oom_kills"),
            "alive": run["alive_at_end"], "exit_code": run["exit_code"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--cap", default="640MiB", help="the cgroup's memory limit (page cache included)")
    ap.add_argument("--budget", default="150MiB", help="tierlm's --max-memory cpu=")
    ap.add_argument("--offload-dir", default="/tmp/tierlm-pressure-off")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--ramp", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    ap.add_argument("--stage-s", type=float, default=40)
    ap.add_argument("--prompt-words", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--configs", default="migrate,fixed")
    ap.add_argument("--tierlm-args", default="", help="more flags for both configs, e.g. '--kv-memory 8MiB'")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    runs = []
    for rep in range(a.reps):
        configs = a.configs.split(",")
        for config in configs if rep % 2 == 0 else configs[::-1]:
            print(f"rep {rep + 1}: {config} ...", flush=True)
            run = run_config(a, config, len(runs))
            run["args_max_tokens"] = a.max_tokens
            runs.append(run)
    done = sorted({r["i"] for run in runs for r in run["results"] if r["status"] == 200})
    print(f"references: {len(done)} prompts alone ...", flush=True)
    ref = references(a, done)
    cap = parse_size(a.cap)
    rows = [summarise(run, ref, cap) for run in runs]
    cols = ["config", "requests", "completed", "http_429", "http_503", "lost", "wrong", "ttft_p50", "ttft_p99",
            "tok_s", "max_running", "running_per_gib", "max_kv_blocks", "min_resident_layers", "demotions",
            "promotions", "max_pressure", "peak_mib", "oom_kills", "alive"]
    print(f"\ncap {a.cap} (cgroup: {unavailable_reason() or 'yes'}), budget {a.budget}, ramp {a.ramp} x {a.stage_s:g} s, "
          f"{a.max_tokens} tokens per request")
    for row in rows:
        print("  " + "  ".join(f"{c}={row[c]:.3g}" if isinstance(row[c], float) else f"{c}={row[c]}" for c in cols))
    by = {c: [r for r in rows if r["config"] == c] for c in a.configs.split(",")}
    if all(by.get(c) for c in ("migrate", "fixed")):
        med = lambda c, k: statistics.median(r[k] for r in by[c])  # noqa: E731
        print(f"migrate / fixed: completed {med('migrate', 'completed') / max(med('fixed', 'completed'), 1):.2f}x, "
              f"tok/s {med('migrate', 'tok_s') / max(med('fixed', 'tok_s'), 1e-9):.2f}x, most running "
              f"{med('migrate', 'max_running'):.0f} vs {med('fixed', 'max_running'):.0f} "
              f"({med('migrate', 'running_per_gib'):.1f} vs {med('fixed', 'running_per_gib'):.1f} per GiB)")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine_info(), "args": vars(a), "rows": rows,
                                            "runs": runs, "reference": ref}, indent=1, default=str))


if __name__ == "__main__":
    main()
