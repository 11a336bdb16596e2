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
    so nobody starts warm; then the disk is measured before and after the run it serves, on the file that
    run reads, and the highest rate counts (a virtual disk's rate depends on what its host cached; tierlm's
    worker also times its streamer alone, no compute, after its generations):
    O_DIRECT 8 MiB reads (tierlm.offload.calibrate.read_bandwidth) of tierlm's offload store with its plan's
    I/O threads, or of the GGUF with --disk-queue-depth in flight for llama.cpp.
  * Rounds (--reps) alternate the engines (every cap's engines, then the resident ones); medians over all
    counted generations. The offload stores are built once before the rounds, outside any cgroup, untimed.

Columns: s/token = decode time per token after the first (TTFT excluded), median. Disk bytes per token
(per forward pass: a short prefill streams the weights once, like a decode step): tierlm from its own
counters (RequestOutput.metrics.tiers.disk_bytes / forward_passes); llama.cpp from the worker's
/proc/self/io read_bytes delta (block-layer reads it caused, mmap page faults included); the /proc figure is
shown for every engine as a cross-check. achieved GB/s = bytes per token ÷ s/token. roofline = max(bytes per
token ÷ the disk GB/s measured next to the run, the matching resident engine's s/token); "% roof" =
roofline ÷ s/token. "x llama" = s/token ÷ llama.cpp's at the same cap (< 1: tierlm faster).

Files: this script is the driver (command line, store preparation, the rounds of fresh worker processes in
their cgroups); _ltm_worker.py is what a worker runs, _ltm_report.py the summary and tables, and
_ltm_engines.py the engine table all three share.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from _ltm_engines import DEFAULT_ENGINES, ENGINES  # noqa: E402
from _ltm_report import progress_line, report  # noqa: E402
from _ltm_worker import worker  # noqa: E402


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


def measure_disk(a: argparse.Namespace, engine: str, budget: str | None, io_threads: dict) -> float:
    """O_DIRECT read bandwidth of the file this engine will read, with its own reads in flight: tierlm's offload
    store (its plan's I/O threads) or the GGUF (--disk-queue-depth). A virtual disk's speed differs by file
    (the host caches what was read lately), so the GGUF's speed is not the store's."""
    from _ltm_engines import store_dir

    from tierlm.offload.calibrate import read_bandwidth
    spec = ENGINES[engine]
    if spec.kind == "tierlm" and budget is not None:
        store = store_dir(a.offload_dir, spec.quant, budget) / "layers.bin"
        if store.is_file():
            return read_bandwidth(store, io_threads.get((spec.quant, budget)) or a.disk_queue_depth, a.disk_bytes)[0]
    return read_bandwidth(Path(a.model), a.disk_queue_depth, a.disk_bytes)[0]


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
    ap.add_argument("--disk-bytes", default="4GiB", help="how much of the file the disk probe reads (at most)")
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
    io_threads: dict[tuple[str, str], int] = {}  # (quant, budget) -> the plan's I/O threads
    try:
        # untimed, outside any cgroup: build each offload store once (a worker would otherwise build it under the cap)
        for b in dict.fromkeys(budgets):
            for n in (n for n in names if ENGINES[n].kind == "tierlm" and ENGINES[n].capped):
                t = time.perf_counter()
                rec = driver.run(n, None, b, prepare=True)
                prepared.append(rec)
                if rec["result"]:
                    io_threads[(ENGINES[n].quant, b)] = rec["result"]["info"].get("io_threads", 0)
                print(f"prepared {n} budget cpu={b}: {rec['status']}, {time.perf_counter() - t:.1f} s"
                      + (f" ({rec['result']['info']})" if rec["result"] else ""), flush=True)
        schedule = [(n, cap, b) for cap, b in zip(caps, budgets) for n in names if ENGINES[n].capped]
        schedule += [(n, None, None) for n in names if not ENGINES[n].capped]
        for r in range(a.reps):
            for n, cap, b in schedule:
                evict(files, a.drop_caches)
                left = cached_bytes(files)
                before = measure_disk(a, n, b, io_threads)
                rec = driver.run(n, cap, b)
                after = measure_disk(a, n, b, io_threads)
                # the disk's best for this file next to the run: a virtual disk reads a file faster once its host
                # has cached it (the run itself warms it), so the higher of the two is the honest bound
                stream = (rec["result"] or {}).get("stream_gbps")  # tierlm's streamer, no compute, same store
                rec |= {"round": r + 1, "disk_gbps": max(before, after, stream or 0), "disk_gbps_before": before,
                        "disk_gbps_after": after, "stream_gbps": stream, "cached_before": left}
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




if __name__ == "__main__":
    main()
