"""`tierlm calibrate`: measure this machine's tiers once and save a profile the planner reuses.

Measures disk O_DIRECT read bandwidth (4 MiB requests, `queue_depth` reader threads), RAM bandwidth
(a large tensor copy), GEMV throughput per dtype (weight bytes streamed per second in a decode-shaped
matmul) and, with CUDA, pinned host->device bandwidth. Pure measurement; no model needed.
"""
from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tierlm.memory.directio import AlignedBuffer, DirectFile, drop_from_page_cache
from tierlm.progress import progress_bar

PROFILE_VERSION = 1
REQUEST_BYTES = 4 << 20


@dataclass
class Profile:
    disk_read_gbps: float  # O_DIRECT sequential read, GB/s (1e9 bytes)
    disk_direct: bool  # False when the filesystem refused O_DIRECT (buffered + DONTNEED instead)
    ram_gbps: float  # bytes read + written per second by a large copy
    gemv_gbps: dict[str, float]  # dtype -> weight bytes per second through F.linear with one token
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


def measure_disk(directory: Path, file_bytes: int, queue_depth: int = 32, progress: bool | None = None) -> tuple[float, bool]:
    """Write a scratch file, evict it from the page cache, read it back with O_DIRECT; GB/s."""
    path = directory / ".tierlm-calibrate.bin"
    chunk = os.urandom(REQUEST_BYTES)  # incompressible, so a compressing device cannot flatter itself
    n_req = max(1, file_bytes // REQUEST_BYTES)
    bar = progress_bar(2 * n_req, "calibrating disk", progress, unit="req")
    try:
        with path.open("wb") as f:
            for _ in range(n_req):
                f.write(chunk)
                bar.update()
        drop_from_page_cache(path)
        with DirectFile(path) as df:
            bufs = [AlignedBuffer(REQUEST_BYTES) for _ in range(queue_depth)]

            def read(k: int) -> int:
                n = df.read_into(bufs[k % queue_depth].view, k * REQUEST_BYTES, REQUEST_BYTES)
                bar.update()
                return n

            t = time.perf_counter()
            # NOTE: at most queue_depth requests in flight, each into its own buffer (k % queue_depth).
            with ThreadPoolExecutor(queue_depth) as pool:
                total = sum(pool.map(read, range(n_req)))
            elapsed = time.perf_counter() - t
            for b in bufs:
                b.close()
            direct = df.direct
    finally:
        bar.close()
        path.unlink(missing_ok=True)
    return total / elapsed / 1e9, direct


def measure_ram(nbytes: int = 256 << 20, reps: int = 5) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch pages once
    return 2 * nbytes / _median_time(lambda: dst.copy_(src), reps) / 1e9


def measure_gemv(dtype: torch.dtype, rows: int = 8192, cols: int = 4096, reps: int = 7) -> float:
    """Weight bytes per second for x[1, cols] @ W[rows, cols]^T: decode's shape, memory-bound."""
    w = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    F.linear(x, w)
    return w.numel() * w.element_size() / _median_time(lambda: F.linear(x, w), reps) / 1e9


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


def calibrate(directory: Path, disk_bytes: int = 1 << 30, queue_depth: int = 32,
              progress: bool | None = None) -> Profile:
    disk, direct = measure_disk(directory, disk_bytes, queue_depth, progress)
    return Profile(
        disk_read_gbps=disk, disk_direct=direct, ram_gbps=measure_ram(),
        gemv_gbps={"float32": measure_gemv(torch.float32), "bfloat16": measure_gemv(torch.bfloat16)},
        h2d_gbps=measure_h2d(), threads=torch.get_num_threads(),
        machine={"cpu_count": str(os.cpu_count()), "platform": platform.platform(), "torch": torch.__version__,
                 "disk_dir": str(directory)},
    )


def describe_profile(p: Profile) -> str:
    disk = f"{p.disk_read_gbps:.2f} GB/s" + ("" if p.disk_direct else " (buffered + DONTNEED: O_DIRECT refused)")
    rows = [("disk read (O_DIRECT, 4 MiB requests)", disk), ("RAM copy", f"{p.ram_gbps:.1f} GB/s")]
    rows += [(f"GEMV {d} (weight bytes)", f"{v:.1f} GB/s") for d, v in p.gemv_gbps.items()]
    rows.append(("pinned host -> CUDA", f"{p.h2d_gbps:.1f} GB/s" if p.h2d_gbps else "no CUDA"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows) + f"\n({p.threads} threads)"


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
