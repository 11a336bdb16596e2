"""Larger than memory: llama.cpp (mmap) vs tierlm (int4 / int8 streamed under a budget) on the same GGUF,
each engine in its own process inside a memory cgroup that caps RAM *and* page cache, side by side in one run.

    .venv/bin/tierlm synth --format gguf ... /work/models/llama-7b-q4_1.gguf          # ~3.8 GB, Q4_1
    sudo .venv/bin/python benchmarks/larger_than_memory.py --model /work/models/llama-7b-q4_1.gguf \\
        --cap 2GiB,6GiB --budget 1536MiB,5GiB --tokens 8 --reps 3 --threads 2 \\
        --offload-dir /work/off --json out/ltm.json

Engines (--engines, comma list):
  llama.cpp              llama-cpp-python on the GGUF as it is (mmap, n_threads = --threads), under the cap.
  tierlm-int4 / -int8    LLM(model, quant=int4|int8, max_memory={"cpu": BUDGET}, offload_dir=...), under the cap:
                         what does not fit the budget streams from the offload store with O_DIRECT.
                         (Q4_1 blocks become int4 g=32 without loss; int8 requantises per channel.)
  tierlm-resident        tierlm int4 with no budget and no cap: the resident compute floor, and the reference
                         for the greedy-token comparison. tierlm-resident-int8: the int8 floor.
  llama.cpp-resident     llama.cpp with no cap (optional): llama.cpp's own floor.

Method (the team's BENCHMARKS.md):
  * Every engine runs in a FRESH worker process (this script with --worker ENGINE), so its peak RSS and its
    cgroup are its own. A worker loads the model, runs one uncounted warm-up generation of --warmup-tokens,
    then --gens counted generations of --tokens tokens (greedy, EOS ignored, the same fixed prompt ids
    1..--prompt-tokens for every engine), and prints one JSON line.
  * As root with cgroup v1, each worker runs in /sys/fs/cgroup/memory/tierlm-bench-PID (made fresh per worker,
    memory.limit_in_bytes = the cap, memsw too when swap is accounted), joined before exec, so the page cache
    it faults in is charged to it. Resident engines run in an unlimited cgroup (peak still measured). The
    cgroup is removed after each worker, also on Ctrl-C / SIGTERM. Without root or cgroup v1 the run says so
    and falls back to tierlm's --max-memory alone (llama.cpp is then NOT capped).
  * Before every worker the GGUF and every file under --offload-dir are dropped from the page cache
    (posix_fadvise DONTNEED; --drop-caches also writes /proc/sys/vm/drop_caches) and fincore checks the rest,
    so nobody starts warm; then the disk is measured: O_DIRECT reads of the GGUF (8 MiB requests,
    --disk-queue-depth in flight, tierlm.memory.calibrate.read_bandwidth), next to the run it serves.
  * Rounds (--reps) alternate the engines (every cap's engines, then the resident ones); medians over all
    counted generations. The offload stores are built once before the rounds, outside any cgroup, untimed.

Columns: s/token = decode time per token after the first (TTFT excluded), median. Disk bytes per token
(per forward pass: a short prefill streams the weights once, like a decode step): tierlm from its own
counters (RequestOutput.metrics.tiers.disk_bytes / forward_passes); llama.cpp from the worker's
/proc/self/io read_bytes delta (block-layer reads it caused, mmap page faults included); the /proc figure is
shown for every engine as a cross-check. achieved GB/s = bytes per token ÷ s/token. roofline = max(bytes per
token ÷ the disk GB/s measured next to the run, the matching resident engine's s/token); "% roof" =
roofline ÷ s/token. "x llama" = s/token ÷ llama.cpp's at the same cap (< 1: tierlm faster).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

GiB, MiB = 1 << 30, 1 << 20


@dataclass(frozen=True)
class EngineSpec:
    kind: str  # "llama.cpp" | "tierlm"
    quant: str  # tierlm's quant ("int4" | "int8"); "" for llama.cpp
    capped: bool  # runs under the cap (and tierlm under the budget); else resident, unlimited
    floor: str | None  # the resident engine whose s/token is this one's compute floor


ENGINES = {
    "llama.cpp": EngineSpec("llama.cpp", "", True, "llama.cpp-resident"),
    "tierlm-int4": EngineSpec("tierlm", "int4", True, "tierlm-resident"),
    "tierlm-int8": EngineSpec("tierlm", "int8", True, "tierlm-resident-int8"),
    "tierlm-resident": EngineSpec("tierlm", "int4", False, None),
    "tierlm-resident-int8": EngineSpec("tierlm", "int8", False, None),
    "llama.cpp-resident": EngineSpec("llama.cpp", "", False, None),
}
DEFAULT_ENGINES = "llama.cpp,tierlm-int4,tierlm-int8,tierlm-resident"
REFERENCE = "tierlm-resident"  # greedy tokens are compared with this engine's


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    """Ids 1..n wrapping below vocab_size: tierlm.bench.prompt_ids' formula, without importing torch."""
    return [i % (vocab_size - 1) + 1 for i in range(n)]


def store_dir(offload_dir: str, quant: str, budget: str) -> Path:
    """One offload store per (quant, budget): a store is built for one placement's units."""
    return Path(offload_dir) / f"{quant}-{budget.replace('/', '_')}"


# --- worker side -----------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL): a worker never outlives the driver (nor keeps its cgroup busy)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _proc_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class LlamaCppWorker:
    """llama.cpp through llama-cpp-python (as benchmarks/decode.py drives it): eval() the prompt, then one token
    per eval(), greedy by argmax over the context's logits. mmap on (llama.cpp's default)."""

    def __init__(self, a: argparse.Namespace):
        import llama_cpp
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.context,
                                   use_mmap=True, verbose=False)
        self.vocab_size = self.llm.n_vocab()

    def _argmax(self) -> int:
        import numpy as np
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab_size,))))

    def generate(self, ids: list[int], n: int) -> dict:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        token = self._argmax()
        ttft = time.perf_counter() - t0
        tokens, decode_s = [token], 0.0
        for _ in range(n - 1):
            t0 = time.perf_counter()
            self.llm.eval([token])
            token = self._argmax()
            decode_s += time.perf_counter() - t0
            tokens.append(token)
        return {"ttft_s": ttft, "decode_s": decode_s, "decode_tokens": n - 1, "forward_passes": n,
                "token_ids": tokens, "disk_bytes": None}

    def info(self) -> dict:
        return {"llama_cpp_version": self.version, "n_ctx": self.llm.n_ctx()}


class TierlmWorker:
    def __init__(self, a: argparse.Namespace, spec: EngineSpec):
        from tierlm import LLM
        budget = a.budget if spec.capped else None
        self.llm = LLM(a.model, threads=a.threads, quant=spec.quant, max_context=a.context, progress=False,
                       max_memory={"cpu": budget} if budget else None,
                       offload_dir=store_dir(a.offload_dir, spec.quant, budget) if budget else None,
                       enable_prefix_caching=False)  # every generation prefills, as llama.cpp after reset()
        self.vocab_size = self.llm.config.vocab_size

    def generate(self, ids: list[int], n: int) -> dict:
        from tierlm import SamplingParams
        out = self.llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
        m, t = out.metrics, out.metrics.tiers
        return {"ttft_s": m.ttft_s, "decode_s": m.decode_s, "decode_tokens": m.decode_tokens,
                "forward_passes": t.forward_passes, "token_ids": out.token_ids, "disk_bytes": t.disk_bytes,
                "io_busy_s": t.io_busy_s, "io_wait_s": t.io_wait_s, "forward_s": t.forward_s}

    def info(self) -> dict:
        import torch

        from tierlm.memory.tiers import Tier
        llm, p = self.llm, self.llm.plan
        d = {"dtype": str(llm.dtype).removeprefix("torch."), "max_context": llm.max_context,
             "profile_calibrated": llm.profile_calibrated, "profile_disk_gbps": llm.profile.disk_read_gbps,
             "io_threads": llm.profile.disk_queue_depth, "torch_threads": torch.get_num_threads()}
        if p is not None:
            d |= {"layers_on_disk": p.count(Tier.DISK), "ring_depth": p.ring_depth,
                  "planned_disk_bytes_per_token": p.disk_bytes_per_token, "planned_s_per_token": p.token_s}
        return d


def worker(a: argparse.Namespace) -> None:
    _die_with_parent()
    spec = ENGINES[a.worker]
    t = time.perf_counter()
    engine = LlamaCppWorker(a) if spec.kind == "llama.cpp" else TierlmWorker(a, spec)
    res = {"engine": a.worker, "load_s": time.perf_counter() - t, "info": engine.info(), "gens": []}
    if not a.prepare:
        ids = prompt_ids(engine.vocab_size, a.prompt_tokens)
        if a.warmup_tokens:
            engine.generate(ids, a.warmup_tokens)  # not counted: first-touch allocations, ring fill
        for _ in range(a.gens):
            io, majflt = _proc_read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            g = engine.generate(ids, a.tokens)
            g["proc_read_bytes"] = _proc_read_bytes() - io
            g["majflt"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - majflt
            res["gens"].append(g)
    res |= {"peak_rss": _status_kib("VmHWM"), "rss_anon_end": _status_kib("RssAnon"),
            "rss_file_end": _status_kib("RssFile")}
    print("RESULT " + json.dumps(res), flush=True)


# --- driver side -----------------------------------------------------------------------------------------
class Driver:
    """Runs workers one at a time; owns the current worker process and its cgroup until they are gone."""

    def __init__(self, a: argparse.Namespace, use_cgroup: bool):
        self.a, self.use_cgroup = a, use_cgroup
        self.proc: subprocess.Popen | None = None
        self.cgroup = None

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # our own worker, by its pid
            self.proc.wait()
        self.proc = None
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None

    def argv(self, engine: str, budget: str | None, prepare: bool) -> list[str]:
        a = self.a
        argv = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model", a.model,
                "--budget", budget or "none", "--offload-dir", a.offload_dir, "--tokens", str(a.tokens),
                "--gens", str(a.gens), "--warmup-tokens", str(a.warmup_tokens), "--threads", str(a.threads),
                "--prompt-tokens", str(a.prompt_tokens), "--context", str(a.context)]
        return argv + (["--prepare"] if prepare else [])

    def run(self, engine: str, cap: int | None, budget: str | None, prepare: bool = False) -> dict:
        """One worker from start to exit -> {status, result (the worker's JSON), cgroup readings, wall_s}."""
        from _cgroup import MemoryCgroup
        argv = self.argv(engine, budget, prepare)
        rec: dict = {"engine": engine, "cap": cap, "budget": budget}
        if self.use_cgroup and not prepare:
            self.cgroup = MemoryCgroup.create(cap if ENGINES[engine].capped else None)
            argv = self.cgroup.wrap(argv)
        t = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            out, _ = self.proc.communicate(timeout=self.a.timeout)
            rc = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            rc = "timeout"
        rec["wall_s"] = time.perf_counter() - t
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        rec["result"] = json.loads(lines[-1][len("RESULT "):]) if lines else None
        if self.cgroup is not None:
            cg = self.cgroup
            rec["cgroup"] = {"path": str(cg.path), "limit": cap if ENGINES[engine].capped else None,
                             "peak": cg.peak_bytes(), "failcnt": cg.failcnt(), "oom_kills": cg.oom_kills()}
        oom = (rec.get("cgroup") or {}).get("oom_kills")
        rec["status"] = ("ok" if rc == 0 and rec["result"] else "timeout" if rc == "timeout"
                         else "OOM-killed" if oom else f"failed (exit {rc})")
        self.proc = None
        self.cleanup()
        return rec


def measure_disk(path: str, queue_depth: int, limit: int) -> float:
    from tierlm.memory.calibrate import read_bandwidth
    return read_bandwidth(Path(path), queue_depth, limit)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a GGUF file (both engines read the same file)")
    ap.add_argument("--cap", default="2GiB", help="cgroup memory limit(s), comma list: one set of capped runs each")
    ap.add_argument("--budget", default="1536MiB",
                    help="tierlm --max-memory cpu= value: one for every cap, or a comma list matching --cap")
    ap.add_argument("--tokens", type=int, default=8, help="new tokens per counted generation (EOS ignored)")
    ap.add_argument("--reps", type=int, default=3, help="rounds: each engine gets a fresh worker per round")
    ap.add_argument("--gens", type=int, default=1, help="counted generations per worker")
    ap.add_argument("--warmup-tokens", type=int, default=2, help="uncounted warm-up generation per worker (0: none)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp n_threads and tierlm threads")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (fixed ids 1..N)")
    ap.add_argument("--context", type=int, default=512, help="llama.cpp n_ctx and tierlm max_context")
    ap.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma list from {', '.join(ENGINES)}")
    ap.add_argument("--offload-dir", default="out/ltm-offload", help="tierlm offload stores (one per quant, budget)")
    ap.add_argument("--disk-queue-depth", type=int, default=32, help="O_DIRECT reads in flight for the disk probe")
    ap.add_argument("--disk-bytes", default="4GiB", help="how much of the GGUF the disk probe reads (at most)")
    ap.add_argument("--drop-caches", action="store_true", help="also echo 1 > /proc/sys/vm/drop_caches (root)")
    ap.add_argument("--no-cgroup", action="store_true", help="do not cap with a cgroup (budget only)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a worker is killed")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tokens < 2 or a.reps < 1 or a.gens < 1 or a.threads < 1 or a.warmup_tokens < 0:
        ap.error("need --tokens >= 2, --reps >= 1, --gens >= 1, --threads >= 1, --warmup-tokens >= 0")
    if a.worker:
        if a.budget == "none":
            a.budget = None
        return worker(a)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _cgroup import remove_stale, unavailable_reason
    from tierlm.config import format_size, parse_size

    names = a.engines.split(",")
    if unknown := [n for n in names if n not in ENGINES]:
        ap.error(f"unknown engine(s) {unknown} (choose from {', '.join(ENGINES)})")
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None and any(ENGINES[n].kind == "llama.cpp" for n in names):
        skipped = [n for n in names if ENGINES[n].kind == "llama.cpp"]
        print(f"NOTE: llama-cpp-python is not installed in {sys.prefix}: skipping {', '.join(skipped)} "
              "(pip install --no-deps wheels/llama_cpp_python*.whl)", flush=True)
        names = [n for n in names if n not in skipped]
    caps = [parse_size(c) for c in a.cap.split(",")]
    budgets = a.budget.split(",")
    if len(budgets) == 1:
        budgets *= len(caps)
    if len(budgets) != len(caps):
        ap.error("--budget needs one value or one per --cap")
    for b in budgets:
        parse_size(b)
    a.disk_bytes = parse_size(a.disk_bytes)
    a.model = os.path.abspath(a.model)
    a.offload_dir = os.path.abspath(a.offload_dir)
    Path(a.offload_dir).mkdir(parents=True, exist_ok=True)

    reason = "--no-cgroup" if a.no_cgroup else unavailable_reason()
    if reason:
        print(f"NOTE: no memory cgroup ({reason}): tierlm runs under --max-memory alone, llama.cpp runs UNCAPPED "
              "and the page cache is not charged to anyone.", flush=True)
    else:
        if stale := remove_stale():
            print(f"removed stale cgroups: {', '.join(stale)}")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)

    from _cgroup import cached_bytes, evict
    driver = Driver(a, use_cgroup=not reason)
    files = [Path(a.model), Path(a.offload_dir)]
    runs: list[dict] = []
    prepared: list[dict] = []
    try:
        # untimed, outside any cgroup: build each offload store once (a worker would otherwise build it under the cap)
        for b in dict.fromkeys(budgets):
            for n in (n for n in names if ENGINES[n].kind == "tierlm" and ENGINES[n].capped):
                t = time.perf_counter()
                rec = driver.run(n, None, b, prepare=True)
                prepared.append(rec)
                print(f"prepared {n} budget cpu={b}: {rec['status']}, {time.perf_counter() - t:.1f} s"
                      + (f" ({rec['result']['info']})" if rec["result"] else ""), flush=True)
        schedule = [(n, cap, b) for cap, b in zip(caps, budgets) for n in names if ENGINES[n].capped]
        schedule += [(n, None, None) for n in names if not ENGINES[n].capped]
        for r in range(a.reps):
            for n, cap, b in schedule:
                evict(files, a.drop_caches)
                left = cached_bytes(files)
                gbps = measure_disk(a.model, a.disk_queue_depth, a.disk_bytes)
                rec = driver.run(n, cap, b)
                rec |= {"round": r + 1, "disk_gbps": gbps, "cached_before": left}
                runs.append(rec)
                print(progress_line(rec, format_size), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: worker killed, cgroup removed; partial results follow", flush=True)
    finally:
        driver.cleanup()
        evict(files)
    result = report(a, names, caps, budgets, runs, prepared, reason, format_size)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.json}")


def _s_per_token(g: dict) -> float:
    return g["decode_s"] / g["decode_tokens"] if g["decode_tokens"] else float("nan")


def _bytes_per_token(engine: str, g: dict) -> float:
    """tierlm: its own disk counter; llama.cpp: /proc/self/io read_bytes. Per forward pass."""
    n = max(g["forward_passes"], 1)
    own = g["disk_bytes"] if ENGINES[engine].kind == "tierlm" else g["proc_read_bytes"]
    return own / n


def progress_line(rec: dict, fmt) -> str:
    cap = "no cap" if rec["cap"] is None or not ENGINES[rec["engine"]].capped else f"cap {fmt(rec['cap'])}"
    if rec["cap"] is not None and "cgroup" not in rec:
        cap += " (not enforced)"
    s = f"round {rec['round']} {rec['engine']:<21} {cap:<13} disk {rec['disk_gbps']:.2f} GB/s: {rec['status']}"
    if rec["result"] and rec["result"]["gens"]:
        g = rec["result"]["gens"]
        s += (f", {statistics.median(_s_per_token(x) for x in g):.3f} s/token, "
              f"{statistics.median(_bytes_per_token(rec['engine'], x) for x in g) / GiB:.3f} GiB/token, "
              f"peak RSS {fmt(rec['result']['peak_rss'])}")
    if "cgroup" in rec:
        s += f", cgroup peak {fmt(rec['cgroup']['peak'])}, oom_kill {rec['cgroup']['oom_kills']}"
    return s + f" ({rec['wall_s']:.0f} s)"


def _lead(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(runs: list[dict]) -> dict:
    """(engine, cap) -> medians and maxima over its counted generations / runs."""
    groups: dict[tuple, list[dict]] = {}
    for rec in runs:
        key = (rec["engine"], rec["cap"] if ENGINES[rec["engine"]].capped else None)
        groups.setdefault(key, []).append(rec)
    out = {}
    for (engine, cap), recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        gens = [g for r in ok for g in r["result"]["gens"]]
        cgs = [r["cgroup"] for r in recs if "cgroup" in r]
        row = {"engine": engine, "cap": cap, "budget": recs[0]["budget"], "runs": len(recs), "runs_ok": len(ok),
               "statuses": sorted({r["status"] for r in recs}), "gens_counted": len(gens),
               "disk_gbps": statistics.median(r["disk_gbps"] for r in recs),
               "cgroup_peak": max((c["peak"] for c in cgs), default=None),
               "cgroup_failcnt": max((c["failcnt"] for c in cgs), default=None),
               "oom_kills": sum(c["oom_kills"] or 0 for c in cgs) if cgs else None,
               "cached_before_max": max((r["cached_before"] or 0 for r in recs), default=0)}
        if gens:
            row |= {"s_per_token": statistics.median(_s_per_token(g) for g in gens),
                    "s_per_token_all": [_s_per_token(g) for g in gens],
                    "ttft_s": statistics.median(g["ttft_s"] for g in gens),
                    "bytes_per_token": statistics.median(_bytes_per_token(engine, g) for g in gens),
                    "proc_bytes_per_token": statistics.median(g["proc_read_bytes"] / max(g["forward_passes"], 1)
                                                              for g in gens),
                    "majflt_per_token": statistics.median(g["majflt"] / max(g["forward_passes"], 1) for g in gens),
                    "peak_rss": max(r["result"]["peak_rss"] for r in ok),
                    "load_s": statistics.median(r["result"]["load_s"] for r in ok),
                    "info": ok[0]["result"]["info"], "token_ids": gens[0]["token_ids"],
                    "deterministic": all(g["token_ids"] == gens[0]["token_ids"] for g in gens)}
            # the disk measured next to each run, paired with that run's bytes: a swinging disk moves both
            io_s = [_bytes_per_token(engine, g) / (r["disk_gbps"] * 1e9) for r in ok for g in r["result"]["gens"]]
            row["io_s_per_token"] = statistics.median(io_s)
            busy = [g["disk_bytes"] / g["io_busy_s"] / 1e9 for g in gens if g.get("io_busy_s")]
            row["io_busy_gbps"] = statistics.median(busy) if busy else None  # tierlm: bytes / time a read was in flight
        out[(engine, cap)] = row
    return out


def report(a, names, caps, budgets, runs, prepared, cgroup_reason, fmt) -> dict:
    from _common import disk_info, machine_info
    rows = summarize(runs)
    ref = rows.get((REFERENCE, None), {}).get("token_ids")
    for (engine, cap), row in rows.items():
        spec = ENGINES[engine]
        if "s_per_token" not in row:
            continue
        if spec.capped:
            floor = rows.get((spec.floor, None), {}).get("s_per_token")
            row["floor_s_per_token"] = floor
            roof = max(row["io_s_per_token"], floor or 0.0)
            if roof > 0:  # nothing streamed and no floor run: no roofline to speak of
                row["roofline_s"], row["of_roofline"] = roof, roof / row["s_per_token"]
            row["achieved_gbps"] = row["bytes_per_token"] / row["s_per_token"] / 1e9
        anchor = rows.get(("llama.cpp", cap) if spec.capped else ("llama.cpp-resident", None), {})
        if spec.kind == "tierlm" and "s_per_token" in anchor:
            row["x_llama"] = row["s_per_token"] / anchor["s_per_token"]
        if ref is not None:
            n = _lead(row["token_ids"], ref)
            row["greedy_vs_ref"] = "identical" if n == len(ref) == len(row["token_ids"]) else f"{n}/{len(ref)} lead"

    m = machine_info()
    m["disk_model"] = disk_info(a.model)
    m["disk_offload"] = disk_info(a.offload_dir)
    print(f"\nmachine: {m['cpu']} | {m['cores']} cores | RAM {m['ram']} | disk {m['disk_model']}"
          + (f" (offload dir: {m['disk_offload']})" if m["disk_offload"] != m["disk_model"] else "")
          + f" | GPU {m['gpu']} | torch {m['torch']} | load avg {m['loadavg_1m_at_end']:.2f} (1 min, at end)")
    size = os.path.getsize(a.model)
    print(f"model {a.model} ({size / GiB:.2f} GiB); {a.threads} threads; prompt {a.prompt_tokens} ids, "
          f"context {a.context}; per worker 1 warm-up of {a.warmup_tokens} tokens (not counted) + {a.gens} x "
          f"{a.tokens} tokens counted; {a.reps} round(s); medians")
    print("memory cap: " + ("cgroup v1 memory.limit_in_bytes (page cache charged), one fresh cgroup per worker"
                            if not cgroup_reason else f"NONE ({cgroup_reason}): caps in parentheses are not "
                            "enforced; tierlm keeps to --max-memory, llama.cpp to nothing"))
    hdr = (f"{'engine':<21}{'cap':>9}{'budget':>9}{'s/tok':>8}{'x llama':>8}{'GiB/tok':>8}{'/proc':>7}"
           f"{'ach GB/s':>9}{'disk GB/s':>10}{'roofline':>9}{'% roof':>7}  greedy vs {REFERENCE}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    order = [(n, c) for c in caps for n in names if ENGINES[n].capped] + [(n, None) for n in names
                                                                          if not ENGINES[n].capped]

    def f(v, spec="8.3f", dash="-"):
        """v formatted by spec, or `dash` right-aligned to the spec's width when v is missing."""
        if isinstance(v, (int, float)):
            return format(v, spec)
        return dash.rjust(int(spec.split(".")[0].rstrip("df%")))

    for key in order:
        row = rows.get(key)
        if row is None:
            continue
        engine, cap = key
        cap_s = fmt(cap).replace(" ", "") if cap else "none"
        cap_s = f"({cap_s})" if cgroup_reason and cap else cap_s  # (...): not enforced, no cgroup
        budget = (row["budget"] or "none") if ENGINES[engine].kind == "tierlm" else "-"
        if "s_per_token" not in row:
            print(f"{engine:<21}{cap_s:>9}{budget:>9}  {', '.join(row['statuses'])}")
            continue
        print(f"{engine:<21}{cap_s:>9}{budget:>9}{f(row['s_per_token'])}{f(row.get('x_llama'), '8.2f')}"
              f"{f(row['bytes_per_token'] / GiB)}{f(row['proc_bytes_per_token'] / GiB, '7.3f')}"
              f"{f(row.get('achieved_gbps'), '9.2f')}{f(row['disk_gbps'], '10.2f')}"
              f"{f(row.get('roofline_s'), '9.3f')}{f(row.get('of_roofline'), '7.0%')}"
              f"  {row.get('greedy_vs_ref', '-')}{'' if row['deterministic'] else ' (NOT deterministic)'}")
    mh = (f"{'engine':<21}{'cap':>9}{'peak RSS':>11}{'cg peak':>11}{'failcnt':>9}{'oom_kill':>9}{'majflt/tok':>11}"
          f"{'load s':>8}{'ok runs':>8}  notes")
    print("\n" + mh + "\n" + "-" * len(mh))
    for key in order:
        row = rows.get(key)
        if row is None:
            continue
        engine, cap = key
        info = row.get("info", {})
        notes = []
        if "layers_on_disk" in info:
            notes.append(f"{info['layers_on_disk']} layers on disk, ring {info['ring_depth']}, planned "
                         f"{info['planned_s_per_token']:.3f} s/tok"
                         + ("" if info.get("profile_calibrated") else " (uncalibrated profile)"))
        if row.get("io_busy_gbps"):
            notes.append(f"reads ran at {row['io_busy_gbps']:.2f} GB/s while in flight")
        if row.get("floor_s_per_token") is None and ENGINES[engine].capped and "s_per_token" in row:
            notes.append(f"roofline is I/O only ({ENGINES[engine].floor} not run)")
        if row["cached_before_max"]:
            notes.append(f"{fmt(row['cached_before_max'])} still cached at start")
        print(f"{engine:<21}{(fmt(cap).replace(' ', '') if cap else 'none'):>9}"
              f"{(fmt(row['peak_rss']) if 'peak_rss' in row else '-'):>11}"
              f"{(fmt(row['cgroup_peak']) if row['cgroup_peak'] is not None else 'n/a'):>11}"
              f"{f(row['cgroup_failcnt'], '9d', 'n/a'):>9}{f(row['oom_kills'], '9d', 'n/a'):>9}"
              f"{f(row.get('majflt_per_token'), '11.0f'):>11}{f(row.get('load_s'), '8.1f'):>8}"
              f"{row['runs_ok']:>4}/{row['runs']:<3}  {'; '.join(notes)}")
    print("GiB/tok: tierlm = its disk counter (metrics.tiers.disk_bytes / forward_passes); llama.cpp = "
          "/proc/PID/io read_bytes per eval. '/proc' = read_bytes per forward pass for every engine. "
          "roofline = max(GiB/tok / disk GB/s measured before the run, resident s/token); % roof = roofline / s/tok.\n"
          "peak RSS (VmHWM) counts mapped file pages (shared libraries, an mmap'd GGUF) that the cgroup is not charged "
          "for when another process cached them first; cg peak = memory.max_usage_in_bytes (anon + page cache charged).")
    return {"machine": m, "model": a.model, "model_bytes": size, "caps": caps, "budgets": budgets,
            "tokens": a.tokens, "gens_per_worker": a.gens, "warmup_tokens": a.warmup_tokens, "reps": a.reps,
            "threads": a.threads, "prompt_tokens": a.prompt_tokens, "context": a.context,
            "cgroup": None if cgroup_reason else "v1", "cgroup_unavailable_reason": cgroup_reason,
            "rows": [{k: v for k, v in row.items()} for row in rows.values()], "runs": runs, "prepared": prepared}


if __name__ == "__main__":
    main()
