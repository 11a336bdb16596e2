"""Offload benchmark: a model larger than the budget, tierlm vs HF Accelerate vs the roofline, same run.

    .venv/bin/tierlm synth --preset tinyllama-1.1b --dtype float32 /work/models/tinyllama-fp32
    .venv/bin/python benchmarks/offload.py --model /work/models/tinyllama-fp32 --budget 1GiB \
        --offload-dir /work/off --reps 3 --tokens 4 --json out/offload.json

Engines run in their own worker processes (loaded once, each with its own peak RSS), driven ALTERNATING
by this process: per round, the disk is measured, then each engine decodes `--tokens` tokens after a
prefill of `--prompt-tokens`. The first round is a warm-up and is not counted; medians over the rest.

  tierlm     LLM(model, max_memory={"cpu": budget}, offload_dir=...): planned placement, O_DIRECT ring.
  tierlm-int8 / tierlm-int4   the same budget with quantised weights (W8A16 / W4A16 g=32): the store and the
             ring hold packed bytes (its own store under OFFLOAD_DIR/int8 | int4).
  accelerate from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...).
  resident   tierlm with no budget (the whole model in RAM): the compute floor of a token
             (resident-int8 / resident-int4: the floor of the quantised rows).
  disk       O_DIRECT read of tierlm's offload store file with the streamer's queue depth (GB/s).

Page cache: before EVERY decode step both engines' files (model, offload store, offload folder) are
evicted with posix_fadvise(DONTNEED), untimed, so neither engine is served from RAM outside its budget.
Accelerate reads through the page cache; tierlm reads with O_DIRECT. The bytes each engine pulled into the
page cache during a step are measured (fincore) and reported.

Roofline per token = max(bytes a tierlm row streams ÷ disk GB/s, its resident compute s/token), both measured
here (a quantised row uses its own resident row: resident-int8 / resident-int4; without it, I/O only).
Ratios are oriented so that > 1 means tierlm is better.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402
from _common import machine_info  # noqa: E402

MiB = 1 << 20


# --- worker side -----------------------------------------------------------------------------------
def _evict(paths: list[Path]) -> None:
    for root in paths:
        for f in ([root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _cached_bytes(paths: list[Path]) -> int:
    files = [str(p) for root in paths for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]
    out = subprocess.run(["fincore", "--raw", "--noheadings", "--bytes", "--output", "RES", *files],
                         capture_output=True, text=True, check=False).stdout
    return sum(int(x) for x in out.split())


def _quant(kind: str) -> str:
    """"tierlm-int4" -> "int4"; "tierlm" / "resident" -> "none"."""
    return kind.split("-", 1)[1] if "-" in kind else "none"


def _offload_dir(a: argparse.Namespace, kind: str) -> Path:
    q = _quant(kind)
    return Path(a.offload_dir) / q if q != "none" else Path(a.offload_dir)


class TierlmWorker:
    def __init__(self, a: argparse.Namespace, budget: str | None, quant: str = "none"):
        from tierlm import LLM
        self.llm = LLM(a.model, max_memory={"cpu": budget} if budget else None, quant=quant,
                       offload_dir=_offload_dir(a, a.worker) if budget else None, max_context=a.prompt_tokens + 64,
                       progress=False)

    def decode(self, prompt: int, tokens: int, before) -> tuple[list[float], int]:
        from tierlm.bench import measure_decode
        _, steps, moved = measure_decode(self.llm, prompt, tokens, warmup=0, before_step=before)
        return steps, moved.disk_bytes // max(tokens, 1)

    def predict(self, disk_gbps: float) -> float | None:
        """The planner's s/token for this placement with the disk bandwidth measured in this round."""
        from dataclasses import replace

        from tierlm.offload.planner import predict
        from tierlm.offload.plan_input import plan_input
        llm = self.llm
        if llm.plan is None:
            return None
        profile = replace(llm.profile, disk_read_gbps=disk_gbps)
        inp = plan_input(llm.config, llm.dtype, llm.budget, llm.max_context, profile, cuda=False, quant=llm.quant)
        return predict(inp, llm.plan).token_s

    def describe(self) -> dict:
        from tierlm.offload.tier import Tier
        p = self.llm.plan
        return {} if p is None else {"layers_on_disk": p.count(Tier.DISK),
                                     "ring_depth": p.ring_depth, "predicted_s": p.token_s,
                                     "disk_bytes_per_token": p.disk_bytes_per_token,
                                     "io_threads": p.io_threads}


class AccelerateWorker:
    """Accelerate's offload path: layers beyond the budget live in the offload folder and are loaded
    (synchronously, no prefetch) by hooks around each module's forward."""

    def __init__(self, a: argparse.Namespace, budget: str):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(
            a.model, dtype=torch.float32, device_map="auto", max_memory={"cpu": budget},
            offload_folder=str(Path(a.offload_dir) / "accelerate")).eval()

    @torch.inference_mode()
    def decode(self, prompt: int, tokens: int, before) -> tuple[list[float], int]:
        import time
        from tierlm.bench import prompt_ids
        ids = prompt_ids(self.model.config.vocab_size, prompt)  # the ids tierlm's bench uses
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        steps = []
        for _ in range(tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            before()
            t = time.perf_counter()
            out = self.model(nxt, past_key_values=out.past_key_values, use_cache=True)
            steps.append(time.perf_counter() - t)
        return steps, 0  # bytes unknown: Accelerate reads through the page cache (see cache_bytes)

    def describe(self) -> dict:
        where = list(getattr(self.model, "hf_device_map", {}).values())
        return {"modules_on_disk": where.count("disk"), "modules_on_cpu": where.count("cpu")}


def worker(a: argparse.Namespace) -> None:
    resident = a.worker.startswith("resident")
    budget = None if resident else a.budget
    engine = AccelerateWorker(a, budget) if a.worker == "accelerate" else TierlmWorker(a, budget, _quant(a.worker))
    # this engine's own files: the model, and its offload store / folder
    from tierlm.offload.stats import peak_rss_bytes

    own = Path(a.offload_dir) / "accelerate" if a.worker == "accelerate" else _offload_dir(a, a.worker) / "layers.bin"
    files = [Path(a.model)] + ([own] if not resident else [])
    print(json.dumps({"ready": True, **engine.describe()}), flush=True)
    for line in sys.stdin:
        after_step, after_evict = [], []

        def before() -> None:
            after_step.append(_cached_bytes(files))  # what the previous step (or prefill) left in the cache
            _evict(files)
            after_evict.append(_cached_bytes(files))  # what eviction could not drop (pages still mapped)

        cmd = json.loads(line)
        steps, disk = engine.decode(a.prompt_tokens, cmd["tokens"], before)
        after_step.append(_cached_bytes(files))
        predicted = engine.predict(cmd["disk_gbps"]) if isinstance(engine, TierlmWorker) else None
        print(json.dumps({"steps": steps, "disk_bytes_per_token": disk, "cache_after_step": max(after_step[1:]),
                          "predicted_s": predicted,
                          "cache_after_evict": max(after_evict), "peak_rss": peak_rss_bytes()}), flush=True)


# --- driver side -----------------------------------------------------------------------------------
class Worker:
    def __init__(self, kind: str, a: argparse.Namespace):
        self.kind = kind
        args = [sys.executable, __file__, "--worker", kind, "--model", a.model, "--budget", a.budget,
                "--offload-dir", a.offload_dir, "--prompt-tokens", str(a.prompt_tokens), "--threads", str(a.threads)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.kind} worker died (see its stderr above)")
        return json.loads(line)

    def run(self, tokens: int, disk_gbps: float) -> dict:
        self.proc.stdin.write(json.dumps({"tokens": tokens, "disk_gbps": disk_gbps}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF directory (tierlm synth --preset tinyllama-1.1b --dtype float32)")
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--offload-dir", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4, help="decode steps per engine per round")
    ap.add_argument("--reps", type=int, default=3, help="counted rounds (one more warm-up round runs first)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--engines", default="tierlm,accelerate,resident")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        return worker(a)

    from tierlm.offload.calibrate import read_bandwidth

    kinds = a.engines.split(",")
    workers = {k: Worker(k, a) for k in kinds}  # tierlm first: it builds the offload store
    first = next((k for k in kinds if k.startswith("tierlm")), None)
    store = _offload_dir(a, first or "tierlm") / "layers.bin"  # the disk is measured on a store a row streams
    qd = workers[first].info.get("io_threads", 16) if first else 16
    times: dict[str, list[float]] = {k: [] for k in kinds}
    disk, predicted, last = [], [], {}
    for r in range(a.reps + 1):
        gbps = read_bandwidth(store, qd)[0]  # the whole store: what a token streams, give or take 2 layers
        for k, w in workers.items():
            last[k] = w.run(a.tokens, gbps)
            if r:
                times[k] += last[k]["steps"]
        if r:
            disk.append(gbps)
            if "tierlm" in last:
                predicted.append(last["tierlm"]["predicted_s"])
        print(f"round {r}{' (warm-up)' if not r else ''}: disk {gbps:.2f} GB/s; "
              + "; ".join(f"{k} {statistics.median(last[k]['steps']):.3f} s/token" for k in kinds), flush=True)
    for w in workers.values():
        w.close()
    result = report(a, workers, times, disk, predicted, last)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.json}")


def report(a, workers: dict, times: dict, disk: list[float], predicted: list[float], last: dict) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    gbps = statistics.median(disk)
    res = {"machine": machine_info(), "model": a.model, "budget": a.budget, "tokens_per_round": a.tokens,
           "rounds_counted": a.reps, "disk_gbps": gbps, "s_per_token": med,
           "engines": {k: {**w.info, "peak_rss_mib": last[k]["peak_rss"] / MiB,
                           "page_cache_mib_after_step": last[k]["cache_after_step"] / MiB,
                           "page_cache_mib_after_evict": last[k]["cache_after_evict"] / MiB,
                           "disk_bytes_per_token": last[k]["disk_bytes_per_token"]} for k, w in workers.items()}}
    m = res["machine"]
    print(f"\nmachine: {m['cpu']} | {m['cores']} cores | RAM {m['ram']} | GPU {m['gpu']} | torch {m['torch']}")
    print(f"budget cpu={a.budget}; {a.reps} rounds × {a.tokens} tokens counted (medians); disk {gbps:.2f} GB/s O_DIRECT")
    for k in med:
        e = res["engines"][k]
        print(f"  {k:<11} {med[k]:7.3f} s/token  peak RSS {e['peak_rss_mib']:6.0f} MiB  "
              f"page cache after a step {e['page_cache_mib_after_step']:5.0f} MiB "
              f"(after eviction {e['page_cache_mib_after_evict']:4.0f} MiB)"
              + (f"  disk {e['disk_bytes_per_token'] / 2**30:.2f} GiB/token" if e["disk_bytes_per_token"] else ""))
    for k in (k for k in med if k.startswith("tierlm")):
        streamed = res["engines"][k]["disk_bytes_per_token"]
        io_s = streamed / (gbps * 1e9)
        floor = med.get("resident" + k.removeprefix("tierlm"), 0.0)  # 0 when its resident row did not run
        roof = max(io_s, floor)
        res.setdefault("rows", {})[k] = row = {"roofline_s": roof, "vs_roofline": roof / med[k]}
        print(f"{k}: roofline max({streamed / 2**30:.2f} GiB ÷ {gbps:.2f} GB/s = {io_s:.3f} s, resident compute "
              f"{floor:.3f} s) = {roof:.3f} s/token -> at {roof / med[k]:.0%} of the roofline", end="")
        if "accelerate" in med:
            row["speedup_vs_accelerate"] = med["accelerate"] / med[k]
            print(f"; {med['accelerate'] / med[k]:.2f}× faster than Accelerate", end="")
        print()
    if "tierlm" in med:
        pred = workers["tierlm"].info.get("predicted_s")
        if pred:
            res["predicted_s_saved_profile"] = pred
            res["predicted_s_in_run_disk"] = now = statistics.median(predicted)
            print(f"planner predicted {pred:.3f} s/token with the saved profile (measured/predicted = "
                  f"{med['tierlm'] / pred:.2f}); {now:.3f} s/token with this run's disk bandwidth "
                  f"(measured/predicted = {med['tierlm'] / now:.2f})")
    return res


if __name__ == "__main__":
    main()
