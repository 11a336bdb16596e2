"""`tierlm calibrate`: measure this machine's tiers once and save a profile the planner reuses.

Measures disk O_DIRECT read bandwidth (CHUNK_BYTES requests from `queue_depth` threads: the streamer's
own pattern; without a chosen depth it tries QUEUE_DEPTHS and keeps the fastest, which the streamer then
uses, because networked/virtual disks need many requests in flight to reach their bandwidth), RAM bandwidth (a large tensor copy), GEMV throughput per dtype (weight bytes streamed per
second in a decode-shaped matmul), the fixed cost of one decoder layer beyond its matmul bytes (dispatch,
norms, attention on a tiny layer) and, with CUDA, pinned host->device bandwidth and CUDA GEMV.
Pure measurement; no model needed.
"""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tierlm.config import ModelConfig
from tierlm.kvcache.contiguous import KVCache
from tierlm.memory.directio import AlignedBuffer, DirectFile, drop_from_page_cache
from tierlm.memory.offload_store import CHUNK_BYTES
from tierlm.memory.workspace import Workspace, plan_workspace
from tierlm.model import llama
from tierlm.progress import progress_bar
from tierlm.quant import QuantScheme, kernels, quantize

PROFILE_VERSION = 4
REQUEST_BYTES = CHUNK_BYTES
QUEUE_DEPTHS = (4, 16, 32)


@dataclass
class Profile:
    disk_read_gbps: float  # O_DIRECT sequential read, GB/s (1e9 bytes)
    disk_direct: bool  # False when the filesystem refused O_DIRECT (buffered + DONTNEED instead)
    ram_gbps: float  # bytes read + written per second by a large copy
    gemv_gbps: dict[str, float]  # dtype ("cuda:dtype" on CUDA) or quant kind -> weight bytes/s, one token
    layer_overhead_s: float  # one decoder layer's cost beyond its matmul bytes
    disk_queue_depth: int = 4  # concurrent reads disk_read_gbps was measured with (the streamer's I/O threads)
    h2d_gbps: float | None = None  # pinned host -> CUDA
    threads: int = 1
    machine: dict[str, str] = field(default_factory=dict)
    version: int = PROFILE_VERSION


def default_profile_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tierlm" / "profile.json"


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def read_bandwidth(path: Path, queue_depth: int, limit: int | None = None, tick=None) -> tuple[float, bool]:
    """Read `path` (its first `limit` bytes) with O_DIRECT in REQUEST_BYTES requests, `queue_depth` in flight;
    (GB/s, whether O_DIRECT was used). Also the benchmarks' in-run disk measurement."""
    with DirectFile(path) as df:
        n_req = max(1, min(limit or df.size, df.size) // REQUEST_BYTES)
        bufs: list[AlignedBuffer] = []
        mine = threading.local()  # one buffer per I/O thread: concurrent reads never share bytes

        def read(k: int) -> int:
            if not hasattr(mine, "buf"):
                mine.buf = AlignedBuffer(REQUEST_BYTES)
                bufs.append(mine.buf)
            n = df.read_into(mine.buf.view, k * REQUEST_BYTES, REQUEST_BYTES)
            if tick:
                tick()
            return n

        t = time.perf_counter()
        with ThreadPoolExecutor(queue_depth) as pool:
            total = sum(pool.map(read, range(n_req)))
        elapsed = time.perf_counter() - t
        for b in bufs:
            b.close()
        return total / elapsed / 1e9, df.direct


def measure_disk(directory: Path, file_bytes: int, queue_depth: int | None = None,
                 progress: bool | None = None) -> tuple[float, bool, int]:
    """Write a scratch file, evict it from the page cache, read it back with O_DIRECT at `queue_depth` (or
    at each of QUEUE_DEPTHS, keeping the fastest); (GB/s, O_DIRECT used, queue depth)."""
    path = directory / ".tierlm-calibrate.bin"
    chunk = os.urandom(REQUEST_BYTES)  # incompressible, so a compressing device cannot flatter itself
    n_req = max(1, file_bytes // REQUEST_BYTES)
    depths = (queue_depth,) if queue_depth else QUEUE_DEPTHS
    bar = progress_bar((1 + len(depths)) * n_req, "calibrating disk", progress, unit="req")
    try:
        with path.open("wb") as f:
            for _ in range(n_req):
                f.write(chunk)
                bar.update()
        drop_from_page_cache(path)
        results = {qd: read_bandwidth(path, qd, tick=bar.update) for qd in depths}
    finally:
        bar.close()
        path.unlink(missing_ok=True)
    best = max(results, key=lambda qd: results[qd][0])
    return results[best][0], results[best][1], best


def measure_ram(nbytes: int = 256 << 20, reps: int = 5) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch pages once
    return 2 * nbytes / _median_time(lambda: dst.copy_(src), reps) / 1e9


def measure_gemv(dtype: torch.dtype, rows: int = 8192, cols: int = 4096, reps: int = 7, device: str = "cpu",
                 quant: str = "none") -> float:
    """Weight bytes per second for x[1, cols] @ W[rows, cols]^T: decode's shape, memory-bound. With `quant`
    ("int8" | "int4"), W is quantised and goes through the fused kernel with `dtype` activations; the bytes
    counted are the packed ones (what the planner's unit sizes count)."""
    w = torch.randn(rows, cols) * 0.02
    x = torch.randn(1, cols).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    if quant != "none":
        qt = kernels.prepare(quantize(w, QuantScheme.parse(quant)).to(device), dtype)
        nbytes = qt.nbytes
    else:
        qt = w.to(device=device, dtype=dtype)
        nbytes = qt.numel() * qt.element_size()

    def run() -> None:
        kernels.linear(x, qt)
        sync()

    run()
    return nbytes / _median_time(run, reps) / 1e9


def measure_layer_overhead(reps: int = 50) -> float:
    """Seconds per decode step of a tiny layer (hidden 64): what a layer costs besides streaming its bytes."""
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    shapes = {"attn_norm": (64,), "wqkv": (128, 64), "wo": (64, 64), "ffn_norm": (64,), "w_gateup": (256, 64),
              "w_down": (64, 128)}
    w = llama.LayerWeights(**{k: torch.randn(s) * 0.1 for k, s in shapes.items()})
    cos, sin = llama.rope_tables(llama.rope_inv_freq(cfg, None), 64, torch.float32)
    kv = KVCache(cfg, batch=1, capacity=64, dtype=torch.float32, device="cpu")
    x = torch.randn(1, 1, 64)
    ws = Workspace(plan_workspace(llama.workspace_buffers(cfg, 1, torch.float32, torch.float32)))
    step = kv.step(torch.zeros((1, 1), dtype=torch.long))  # position 0, never finished: every rep redoes it
    with torch.inference_mode():  # layer_forward updates its input in place: give it a fresh copy each time
        t = _median_time(lambda: llama.layer_forward(cfg, w, x.clone(), cos[:1], sin[:1], step.layer(0), ws), reps)
    kv.release()
    ws.release()
    return t


def measure_h2d(nbytes: int = 256 << 20, reps: int = 5) -> float | None:
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def copy() -> None:
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    copy()
    return nbytes / _median_time(copy, reps) / 1e9


def calibrate(directory: Path, disk_bytes: int = 1 << 30, queue_depth: int | None = None,
              progress: bool | None = None) -> Profile:
    disk, direct, queue_depth = measure_disk(directory, disk_bytes, queue_depth, progress)
    gemv = {"float32": measure_gemv(torch.float32), "bfloat16": measure_gemv(torch.bfloat16)}
    gemv |= {q: measure_gemv(torch.bfloat16, quant=q) for q in ("int8", "int4")}  # bf16 activations (W8A16/W4A16)
    if torch.cuda.is_available():
        gemv |= {f"cuda:{d}": measure_gemv(dt, device="cuda") for d, dt in (("float32", torch.float32),
                                                                           ("bfloat16", torch.bfloat16))}
    return Profile(
        disk_read_gbps=disk, disk_direct=direct, ram_gbps=measure_ram(),
        gemv_gbps=gemv, layer_overhead_s=measure_layer_overhead(), disk_queue_depth=queue_depth,
        h2d_gbps=measure_h2d(), threads=torch.get_num_threads(),
        machine={"cpu_count": str(os.cpu_count()), "platform": platform.platform(), "torch": torch.__version__,
                 "disk_dir": str(directory)},
    )


def describe_profile(p: Profile) -> str:
    disk = f"{p.disk_read_gbps:.2f} GB/s" + ("" if p.disk_direct else " (buffered + DONTNEED: O_DIRECT refused)")
    rows = [(f"disk read (O_DIRECT, {REQUEST_BYTES >> 20} MiB requests, {p.disk_queue_depth} in flight)", disk), ("RAM copy", f"{p.ram_gbps:.1f} GB/s")]
    rows += [(f"GEMV {d} (weight bytes)", f"{v:.1f} GB/s") for d, v in p.gemv_gbps.items()]
    rows.append(("layer overhead (beyond matmul bytes)", f"{p.layer_overhead_s * 1e3:.2f} ms"))
    rows.append(("pinned host -> CUDA", f"{p.h2d_gbps:.1f} GB/s" if p.h2d_gbps else "no CUDA"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows) + f"\n({p.threads} threads)"


# Used when no profile is saved: plans still work, predictions are marked uncalibrated.
DEFAULT_PROFILE = Profile(disk_read_gbps=1.0, disk_direct=True, ram_gbps=10.0,
                          gemv_gbps={"float32": 10.0, "bfloat16": 6.0, "int8": 15.0, "int4": 6.0,
                                     "cuda:float32": 1000.0, "cuda:bfloat16": 1000.0},
                          layer_overhead_s=3e-4, h2d_gbps=20.0, machine={"source": "built-in defaults (uncalibrated)"})


def save_profile(profile: Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(profile), indent=1))
    os.replace(tmp, path)  # atomic: a reader sees the old profile or the new one, never half


def load_profile(path: Path) -> Profile | None:
    """The saved profile, or None when absent, unreadable or from another profile version."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != PROFILE_VERSION:
            return None
        return Profile(**data)
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def load_profile_or_default(path: str | Path | None = None) -> tuple[Profile, bool]:
    """(profile, calibrated): the saved profile, or the built-in defaults when none is saved."""
    saved = load_profile(Path(path) if path else default_profile_path())
    return (saved, True) if saved is not None else (DEFAULT_PROFILE, False)
