"""Soak: `tierlm serve` under mixed load for a long time; RSS must stay flat once warmed up, and the host
KV tier's arena is compared with the per-object design on the same replayed allocations.

    .venv/bin/python benchmarks/soak.py --minutes 20 --json /work/soak.json        # ~22 min, 2 cores

Phase 1 (live): the server (127.0.0.1, a small KV pool so cached prefixes keep moving pool -> host arena
(zstd, variable sizes) -> disk and back) gets closed-loop load from --clients threads: prompts built from one
of --prefixes long shared prefixes (Zipf-chosen, so some come back often and others rarely) and a question,
greedy, 8-48 tokens each. Every --sample-s: the server's RSS (/proc), and /metrics (arena fragmentation and
use, tier moves). A repeated (prefix, question, length) must give the same text as its first answer.
It stops by itself after --minutes (SIGTERM: the server drains and exits).
Phase 2 (replay): the host tier's allocation log (--kv-host-log) is replayed in fresh processes on (a) the
arena and (b) one heap object per block (what the tier was before: bytes in a dict, the C allocator
placing them; same malloc settings as the server), sampling RSS as it goes.
Flat: RSS growth after warm-up = median of the last 10% of samples / median of the 10% after warm-up - 1.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from _common import free_port, machine_info, rss_of, scrape_metrics, start_server

WORDS = ("river stone light music garden window paper cloud engine forest coffee market winter signal letter "
         "bridge orange pencil mirror silver planet ladder candle rocket").split()
QUESTIONS = ["Summarise the text.", "What is the first word?", "Is it about nature?", "Name a colour in it.",
             "Count the rivers.", "What comes after bridge?", "Is there a rocket?", "Give it a title."]


def prefixes(n: int, rng: random.Random) -> list[str]:
    return [f"Document {k}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 500)))
            for k in range(n)]


def post(port: int, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def live(a: argparse.Namespace, log: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port), "--threads", str(a.threads),
           "--served-model-name", "m", "--max-context", "1024", "--max-num-seqs", "8",
           "--kv-memory", a.kv_memory, "--kv-host-memory", a.kv_host_memory, "--kv-compress", "zstd",
           "--kv-offload-dir", str(log.parent / "kv"), "--kv-disk-size", "512MiB", "--kv-host-log", str(log)]
    proc = start_server(cmd, port, "tierlm")
    rng = random.Random(0)
    docs = prefixes(a.prefixes, rng)
    weights = [1 / (k + 1) for k in range(a.prefixes)]  # Zipf
    end = time.monotonic() + a.minutes * 60
    first: dict[tuple, str] = {}
    counts = {"ok": 0, "errors": 0, "mismatch": 0, "repeats": 0}
    lock = threading.Lock()

    def client(seed: int) -> None:
        r = random.Random(seed)
        while time.monotonic() < end:
            key = (r.choices(range(a.prefixes), weights)[0], r.randrange(len(QUESTIONS)), r.choice((8, 16, 32, 48)))
            body = {"model": "m", "temperature": 0, "max_tokens": key[2], "messages": [
                {"role": "system", "content": docs[key[0]]}, {"role": "user", "content": QUESTIONS[key[1]]}]}
            try:
                text = post(port, body, 300)["choices"][0]["message"]["content"]
            except (OSError, urllib.error.HTTPError, KeyError, ValueError):
                with lock:
                    counts["errors"] += 1
                continue
            with lock:
                counts["ok"] += 1
                if key in first:
                    counts["repeats"] += 1
                    counts["mismatch"] += first[key] != text
                else:
                    first[key] = text

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples = []
    while time.monotonic() < end:
        time.sleep(a.sample_s)
        m = scrape_metrics(port)
        samples.append({"t": round(time.monotonic() - t0, 1), "rss": rss_of(proc.pid),
                        "frag": m.get("tierlm:kv_host_arena_fragmentation", 0.0),
                        "arena_used": m.get('tierlm:kv_host_arena_bytes{state="used"}', 0.0),
                        "host_puts": m.get('tierlm:kv_tier_moves_total{move="host_puts"}', 0.0),
                        "restores": m.get('tierlm:kv_tier_moves_total{move="host_restores"}', 0.0)
                        + m.get('tierlm:kv_tier_moves_total{move="disk_restores"}', 0.0),
                        "requests": counts["ok"]})
        print(f"  {samples[-1]['t']:7.0f} s  RSS {samples[-1]['rss'] / 2**20:7.1f} MiB  "
              f"frag {samples[-1]['frag']:.3f}  requests {counts['ok']}  errors {counts['errors']}", flush=True)
    for t in threads:
        t.join(timeout=330)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    return {"samples": samples, "counts": counts, "exit_code": rc, "growth": growth([s["rss"] for s in samples],
                                                                                  a.warmup)}


def growth(rss: list[int], warmup: float) -> float:
    """Median of the last 10% of samples over the median of the 10% right after warm-up, minus 1."""
    n = len(rss)
    w, tail = int(n * warmup), max(1, n // 10)
    base = rss[w:w + tail] or rss[-tail:]
    return statistics.median(rss[-tail:]) / statistics.median(base) - 1


def replay(log: Path, design: str, capacity: int, points: int = 200) -> dict:
    """Replay the allocation log on one design in this (fresh) process; RSS at `points` evenly spaced ops."""
    import os

    from tierlm.memory import allocator
    from tierlm.kvcache.arena import Arena
    allocator.return_freed_memory_promptly()  # the server's malloc settings
    ops = [line.split() for line in log.read_text().splitlines()]
    arena = Arena(capacity) if design == "arena" else None
    held: dict[str, object] = {}  # log offset -> the allocation now there (arena offset or a bytes object)
    every = max(1, len(ops) // points)
    rss, pid = [], os.getpid()
    for i, op in enumerate(ops):
        if op[0] == "p":
            n = int(op[2])
            if arena is not None:
                off = arena.alloc(n)
                arena.write(off, b"\x5a" * n)
                held[op[1]] = off
            else:
                held[op[1]] = b"\x5a" * n  # one heap object per block, its pages written
        else:
            x = held.pop(op[1])
            if arena is not None:
                arena.free(x)
        if i % every == 0:
            rss.append(rss_of(pid))
    frag = arena.stats().fragmentation if arena is not None else None
    return {"design": design, "ops": len(ops), "rss": rss, "peak": max(rss), "final_fragmentation": frag}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--prefixes", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-memory", default="24MiB")
    ap.add_argument("--kv-host-memory", default="48MiB")
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=0.25, help="fraction of the run that is warm-up")
    ap.add_argument("--workdir", default="/tmp/tierlm-soak")
    ap.add_argument("--json", default=None)
    ap.add_argument("--replay", nargs=2, metavar=("LOG", "DESIGN"), help=argparse.SUPPRESS)  # phase 2's worker
    ap.add_argument("--capacity", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.replay:
        print(json.dumps(replay(Path(a.replay[0]), a.replay[1], a.capacity)))
        return
    import subprocess

    from tierlm.config import parse_size
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "host.log"
    log.unlink(missing_ok=True)
    result = {"machine": machine_info(), "args": vars(a), "live": live(a, log)}
    cap = parse_size(a.kv_host_memory)
    for design in ("arena", "object"):
        out = subprocess.run([sys.executable, __file__, "--replay", str(log), design, "--capacity", str(cap)],
                             capture_output=True, text=True, check=True, timeout=1800)
        r = json.loads(out.stdout)
        r["growth"] = growth(r.pop("rss"), a.warmup) if r["ops"] else 0.0
        result[design] = r
    lv = result["live"]
    frag = [s["frag"] for s in lv["samples"]]
    print(f"\nlive {a.minutes:g} min: {lv['counts']['ok']} requests, {lv['counts']['errors']} errors, "
          f"{lv['counts']['mismatch']} of {lv['counts']['repeats']} repeats differed; server exit {lv['exit_code']}")
    print(f"  RSS growth after warm-up {100 * lv['growth']:+.2f}%  (first {lv['samples'][0]['rss'] / 2**20:.0f} MiB, "
          f"last {lv['samples'][-1]['rss'] / 2**20:.0f} MiB); arena fragmentation median {statistics.median(frag):.3f}, "
          f"max {max(frag):.3f}")
    for d in ("arena", "object"):
        r = result[d]
        print(f"  replay {d:<6} {r['ops']} ops: peak RSS {r['peak'] / 2**20:.0f} MiB, growth after warm-up "
              f"{100 * r['growth']:+.2f}%" + (f", final fragmentation {r['final_fragmentation']:.3f}"
                                            if r['final_fragmentation'] is not None else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
