"""`tierlm calibrate`: measure this machine's tiers once and save a profile the planner reuses.

Measures disk O_DIRECT read bandwidth as a curve over bytes in flight (1-64 MiB, as the streamer reads:
CHUNK_BYTES requests from several threads; networked/virtual disks need more in flight than local ones), from
which the planner sizes the ring and the I/O threads (offload/disk_model.py), RAM bandwidth (a large tensor copy), GEMV throughput per dtype (weight bytes streamed per
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

from tierlm.config import ModelConfig, cache_dir, format_size
from tierlm.kvcache.paged import PagedKV
from tierlm.kvcache.sequence import KVSequence
from tierlm.memory.directio import AlignedBuffer, DirectFile, drop_from_page_cache
from tierlm.offload.disk_store import CHUNK_BYTES
from tierlm.offload.units import layer_tensors
from tierlm.memory.workspace import Workspace, plan_workspace
from tierlm.model import ops, registry
from tierlm.progress import progress_bar
from tierlm.quant import QuantScheme, kernels, quantize

PROFILE_VERSION = 6  # 6: the layer overhead is measured on the engine's paged, blocked-attention step
REQUEST_BYTES = CHUNK_BYTES
IN_FLIGHT = tuple(m << 20 for m in (1, 2, 4, 8, 16, 32, 64))  # the disk curve's points, bytes in flight
DISK_REPS = 3


@dataclass
class Profile:
    disk_read_gbps: float  # O_DIRECT read, GB/s (1e9 bytes): the best point of disk_curve
    disk_direct: bool  # False when the filesystem refused O_DIRECT (buffered + DONTNEED instead)
    ram_gbps: float  # bytes read + written per second by a large copy
    gemv_gbps: dict[str, float]  # dtype ("cuda:dtype" on CUDA) or quant kind -> weight bytes/s, one token
    layer_overhead_s: float  # one decoder layer's cost beyond its matmul bytes
    disk_curve: list[list[float]] = field(default_factory=list)  # [bytes in flight, GB/s]: the planner's DiskModel
    h2d_gbps: float | None = None  # pinned host -> CUDA
    threads: int = 1
    machine: dict[str, str] = field(default_factory=dict)
    version: int = PROFILE_VERSION


def default_profile_path() -> Path:
    return cache_dir() / "profile.json"


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def read_bandwidth(path: Path, queue_depth: int, limit: int | None = None, tick=None,
                   request: int = REQUEST_BYTES, offset: int = 0) -> tuple[float, bool]:
    """Read `limit` bytes of `path` (all of it by default; from `offset`, wrapping around) with O_DIRECT in
    `request`-byte reads, `queue_depth` in flight; (GB/s, whether O_DIRECT was used). Also the benchmarks'
    in-run disk measurement."""
    with DirectFile(path) as df:
        slots = max(1, df.size // request)
        n_req = max(1, min(limit or df.size, df.size) // request)
        first = offset // request
        bufs: list[AlignedBuffer] = []
        mine = threading.local()  # one buffer per I/O thread: concurrent reads never share bytes

        def read(k: int) -> int:
            if not hasattr(mine, "buf"):
                mine.buf = AlignedBuffer(request)
                bufs.append(mine.buf)
            n = df.read_into(mine.buf.view, (first + k) % slots * request, request)
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


def curve_points(queue_depth: int | None) -> list[tuple[int, int]]:
    """(request bytes, reads in flight) for each measured point: IN_FLIGHT bytes in flight as REQUEST_BYTES
    reads (smaller single reads below that), or just `queue_depth` × REQUEST_BYTES when one depth is asked for."""
    if queue_depth:
        return [(REQUEST_BYTES, queue_depth)]
    return [(min(REQUEST_BYTES, b), max(1, b // REQUEST_BYTES)) for b in IN_FLIGHT]


def measure_disk(directory: Path, file_bytes: int, queue_depth: int | None = None, progress: bool | None = None,
                 reps: int = DISK_REPS) -> tuple[list[tuple[int, float]], bool]:
    """Write a scratch file, evict it from the page cache, read it back with O_DIRECT at each point of the curve
    (curve_points); ([(bytes in flight, median GB/s)], O_DIRECT used). Points alternate within each of `reps`
    rounds, so a disk whose speed drifts (virtual disks do, by ±30% here) biases no point."""
    path = directory / ".tierlm-calibrate.bin"
    chunk = os.urandom(REQUEST_BYTES)  # incompressible, so a compressing device cannot flatter itself
    n_req = max(1, file_bytes // REQUEST_BYTES)
    points = curve_points(queue_depth)
    sample = max(REQUEST_BYTES, n_req * REQUEST_BYTES // (2 if queue_depth else 4))
    bar = progress_bar(n_req + reps * len(points), "calibrating disk", progress, unit="step")
    results: dict[tuple[int, int], list[float]] = {pt: [] for pt in points}
    direct, offset = True, 0
    try:
        with path.open("wb") as f:
            for _ in range(n_req):
                f.write(chunk)
                bar.update()
        drop_from_page_cache(path)
        for _ in range(reps):
            for req, qd in points:
                gbps, direct = read_bandwidth(path, qd, sample, request=req, offset=offset)
                offset += sample  # the next point reads other blocks: no device-side cache of the last read
                results[(req, qd)].append(gbps)
                bar.update()
    finally:
        bar.close()
        path.unlink(missing_ok=True)
    return [(req * qd, sorted(v)[len(v) // 2]) for (req, qd), v in results.items()], direct


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
    model = registry.for_config(cfg)
    w = model.LayerWeights(**{t.leaf: torch.randn(t.shape) * 0.1 for t in layer_tensors(cfg, 0)})
    cos, sin = ops.rope_tables(ops.rope_inv_freq(cfg, None), 64, torch.float32)
    # the engine's KV: a paged pool, a batch-invariant step (blocked attention), as every decode runs
    kv = PagedKV(cfg, num_blocks=4, dtype=torch.float32, device="cpu", caching=False)
    seq = KVSequence(tokens=[0])
    kv.reserve(seq, 1)
    x = torch.randn(1, 1, 64)
    ws = Workspace(plan_workspace(model.workspace_buffers(cfg, 1, torch.float32, torch.float32)))
    step = kv.step([seq], 1)  # position 0, never finished: every rep redoes it
    with torch.inference_mode():  # layer_forward updates its input in place: give it a fresh copy each time
        t = _median_time(lambda: model.layer_forward(cfg, w, x.clone(), cos[:1], sin[:1], step.layer(0), ws), reps)
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
    curve, direct = measure_disk(directory, disk_bytes, queue_depth, progress)
    gemv = {"float32": measure_gemv(torch.float32), "bfloat16": measure_gemv(torch.bfloat16)}
    gemv |= {q: measure_gemv(torch.bfloat16, quant=q) for q in ("int8", "int4")}  # bf16 activations (W8A16/W4A16)
    if torch.cuda.is_available():
        gemv |= {f"cuda:{d}": measure_gemv(dt, device="cuda") for d, dt in (("float32", torch.float32),
                                                                           ("bfloat16", torch.bfloat16))}
    return Profile(
        disk_read_gbps=max(g for _, g in curve), disk_direct=direct, ram_gbps=measure_ram(),
        gemv_gbps=gemv, layer_overhead_s=measure_layer_overhead(), disk_curve=[[b, g] for b, g in curve],
        h2d_gbps=measure_h2d(), threads=torch.get_num_threads(),
        machine={"cpu_count": str(os.cpu_count()), "platform": platform.platform(), "torch": torch.__version__,
                 "disk_dir": str(directory)},
    )


def describe_profile(p: Profile) -> str:
    disk = f"{p.disk_read_gbps:.2f} GB/s" + ("" if p.disk_direct else " (buffered + DONTNEED: O_DIRECT refused)")
    rows = [("disk read (O_DIRECT, best)", disk)]
    rows += [(f"  with {format_size(int(b))} in flight", f"{g:.2f} GB/s") for b, g in p.disk_curve]
    rows.append(("RAM copy", f"{p.ram_gbps:.1f} GB/s"))
    rows += [(f"GEMV {d} (weight bytes)", f"{v:.1f} GB/s") for d, v in p.gemv_gbps.items()]
    rows.append(("layer overhead (beyond matmul bytes)", f"{p.layer_overhead_s * 1e3:.2f} ms"))
    rows.append(("pinned host -> CUDA", f"{p.h2d_gbps:.1f} GB/s" if p.h2d_gbps else "no CUDA"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows) + f"\n({p.threads} threads)"


# Used when no profile is saved: plans still work, predictions are marked uncalibrated.
# Its disk curve assumes a disk that needs 32 MiB in flight (networked and virtual ones do; a local drive is
# served as well by the threads that implies).
DEFAULT_PROFILE = Profile(disk_read_gbps=1.0, disk_direct=True, ram_gbps=10.0,
                          disk_curve=[[8 << 20, 0.6], [16 << 20, 0.8], [32 << 20, 1.0]],
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
