"""Streamed == resident compute: a streamed unit's stored bytes are the kernels' operands (kernel form), so
once its bytes are in the ring, acquiring and computing a layer costs what a resident layer costs.

    .venv/bin/python benchmarks/streamed_compute.py [--quant none,int8,int4] [--tokens 16] [--json out.json]

Measured on TinyLlama-shaped layers (H 2048, I 5632: 26 MiB a layer in int4; 4 layers, more than the L3 cache
holds even in int4) with every layer streamed through a ring of depth 2. Per layer: acquire (timed: views of the
slot, no preparation), then wait until no read is in flight (Streamer.settle: the bytes are in the ring, and no
I/O competes with the timed compute on a 2-core machine), a write of 64 MiB so that neither store's weights are
in the cache, then the layer's compute (timed). Resident and streamed tokens ALTERNATE, each quant in a fresh
process; medians; the ratio streamed / resident is printed with the target (<= 1 + TOLERANCE).
Before kernel form, acquire re-prepared the int4 scales of every matrix, per layer per token.
At the embedded model's tiny layers (2 MiB) a fixed ~0.1 ms per layer shows after each read even so (cache
effects); at real layer sizes it does not (measured: int4 8.7 vs 8.9 ms, int8 14.2 vs 16.1 ms per 4 layers).
tests/test_streamed_compute.py runs measure() once (int4) as the suite's smoke test: every layer through the
ring, an acquire a few % of a layer at most; the timing ratio is this script's figure (it flakes on a busy
2-core machine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tierlm.config import resolve_dtype
from tierlm.engine.runner import Runner
from tierlm.kvcache.paged import PagedKV
from tierlm.kvcache.sequence import KVSequence
from tierlm.model import llama
from tierlm.offload.tier import Tier
from tierlm.offload.weight_store import WeightStore
from tierlm.quant import QuantScheme
from tierlm.synth import synth
from tierlm.weights import open_model

TOKENS = 16  # timed decode tokens per store (after 3 untimed)
TOLERANCE = 0.10
FLUSH_BYTES = 64 << 20  # twice the L3 of the CI machine: written before each timed layer


def tinyllama(out: Path) -> Path:
    """TinyLlama's layer shapes, 4 layers and a small vocabulary (the head is not what is measured)."""
    return synth("tinyllama-1.1b", out, "bfloat16", progress=False,
                 overrides={"num_hidden_layers": 4, "vocab_size": 1024})


class _Timed:
    """One store decoding one token at a time; times each layer's compute with its bytes already in place."""

    def __init__(self, store: WeightStore, dtype: torch.dtype):
        self.store, self.runner = store, Runner(store, dtype, max_context=64)
        self.kv = PagedKV(store.config, 64 // 16, dtype=self.runner.kv_dtype)  # the engine's KV, 64 tokens
        self.seq = KVSequence(tokens=[])
        self.token = torch.tensor([[1]])
        self.acquires: list[float] = []  # seconds of each acquire
        self.flush = torch.zeros(FLUSH_BYTES, dtype=torch.uint8)

    @torch.inference_mode()
    def step(self) -> float:
        cfg, store, runner = self.store.config, self.store, self.runner
        self.seq.tokens.append(1)
        self.kv.reserve(self.seq, 1)
        step = self.kv.step([self.seq], 1)  # as the engine's decode steps
        pos = step.positions
        cos, sin = runner.cos[pos].unsqueeze(1), runner.sin[pos].unsqueeze(1)
        x = store.embed(self.token, runner.device)
        compute = 0.0
        for i in range(cfg.num_layers):
            if store.streamer is not None:
                store.streamer.settle()  # this layer's bytes are in the ring, no read in flight
            self.flush.add_(1)  # untimed: both stores start each layer from DRAM, not from what the L3 kept
            t0 = time.perf_counter()
            w = store.acquire(i)
            t1 = time.perf_counter()
            if store.streamer is not None:
                store.streamer.settle()  # acquire submitted nothing; a slow earlier read would show here
            t2 = time.perf_counter()
            x = llama.layer_forward(cfg, w, x, cos, sin, step.layer(i), runner.workspace)
            compute += time.perf_counter() - t2 + (t1 - t0)
            self.acquires.append(t1 - t0)
            store.release(i)
        step.finish()
        return compute

    def close(self) -> None:
        self.kv.release()
        self.runner.close()
        self.store.close()


def measure(quant: str, model: str, offload_dir: str, tokens: int = TOKENS) -> dict:
    """Median compute per token of a resident and a streamed store, alternating (run in a fresh process)."""
    torch.set_num_threads(2)
    scheme = QuantScheme.parse(quant)
    dtype = resolve_dtype("auto", scheme.enabled)
    resident = _Timed(WeightStore.load_resident(open_model(model), dtype, progress=False, quant=scheme), dtype)
    n = resident.store.config.num_layers
    streamed = _Timed(WeightStore.load_placed(
        open_model(model), dtype, torch.device("cpu"), [Tier.DISK] * n, Tier.DEVICE, Tier.DEVICE,
        progress=False, ring_depth=2, offload_dir=Path(offload_dir), quant=scheme), dtype)
    try:
        times: dict[str, list[float]] = {"resident": [], "streamed": []}
        for k in range(3 + tokens):
            if k == 3:  # warm-up done: the ring's views are built, count from here
                streamed.acquires, warm_units = [], streamed.store.stats.units_streamed
            for name, run in (("resident", resident), ("streamed", streamed)):
                t = run.step()
                if k >= 3:
                    times[name].append(t)
        units = streamed.store.stats.units_streamed - warm_units
        return {"resident": statistics.median(times["resident"]), "streamed": statistics.median(times["streamed"]),
                # the median acquire: one descheduled thread or a page fault on a 2-core CI machine is not its cost
                "units_streamed": units, "layers": n, "per_acquire": statistics.median(streamed.acquires)}
    finally:
        resident.close()
        streamed.close()


def measure_in_child(quant: str, model: Path, offload_dir: Path, tokens: int = TOKENS) -> dict:
    """measure() in a fresh process: a suite's (or an earlier quant's) models, threads and heap make timing noisy."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[5]); from streamed_compute import measure; "
            "print(json.dumps(measure(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))")
    out = subprocess.run([sys.executable, "-c", code, quant, str(model), str(offload_dir), str(tokens),
                          str(Path(__file__).parent)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quant", default="none,int8,int4")
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from _common import machine_info
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = tinyllama(Path(tmp) / "m")
        for quant in a.quant.split(","):
            m = measure_in_child(quant, model, Path(tmp) / f"off-{quant}", a.tokens)
            ratio = m["streamed"] / m["resident"]
            rows[quant] = m | {"ratio": ratio}
            print(f"{quant:5s} streamed {m['streamed'] * 1e3:6.2f} ms vs resident {m['resident'] * 1e3:6.2f} ms per "
                  f"token: {ratio:.3f}x (target <= {1 + TOLERANCE:.2f}); acquire {m['per_acquire'] * 1e6:.0f} us",
                  flush=True)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return 0 if all(r["ratio"] <= 1 + TOLERANCE for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
