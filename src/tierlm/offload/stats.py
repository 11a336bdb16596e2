"""Counters for tiered weights: what moved from which tier, how long I/O took and how long compute waited.

One `TierStats` per WeightStore; the streamer adds I/O, the runner adds forward time. Callers take a
snapshot before and after a request and subtract: stats are cumulative and never reset behind anyone.
"""
from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from tierlm.config import format_size


@dataclass
class TierStats:
    disk_bytes: int = 0  # read from the offload store (O_DIRECT or buffered + DONTNEED)
    h2d_bytes: int = 0  # host -> CUDA copies of streamed units
    units_streamed: int = 0
    retries: int = 0  # chunks re-read after an error or checksum mismatch
    repairs: int = 0  # units rebuilt in place from the source after failing their checksum twice
    restarts: int = 0  # the ring started over out of its cyclic order (reads in flight drained and re-read)
    io_busy_s: float = 0.0  # time the disk was busy (union of read intervals)
    io_wait_s: float = 0.0  # time the runner waited for a unit to arrive
    forward_s: float = 0.0  # wall time inside Runner.forward_groups (compute + waits)
    forward_passes: int = 0

    def __sub__(self, other: "TierStats") -> "TierStats":
        return TierStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def compute_s(self) -> float:
        return max(self.forward_s - self.io_wait_s, 0.0)

    @property
    def serial_s(self) -> float:
        """Compute and I/O one after the other: what a run without any overlap would take."""
        return self.compute_s + self.io_busy_s

    @property
    def overlap(self) -> float:
        """η = 1 − T_total / (ΣT_compute + ΣT_io): 0 = I/O and compute serialised; the best is
        min(c, io) / (c + io), reached when the shorter one hides entirely behind the longer."""
        return 1.0 - self.forward_s / self.serial_s if self.serial_s > 0 else 0.0

    @property
    def best_overlap(self) -> float:
        """η when the shorter of compute and I/O hides entirely behind the longer."""
        return min(self.compute_s, self.io_busy_s) / self.serial_s if self.serial_s > 0 else 0.0

    @property
    def disk_gbps(self) -> float:
        return self.disk_bytes / self.io_busy_s / 1e9 if self.io_busy_s > 0 else 0.0


class BusyClock:
    """Seconds during which at least one read was in flight, with reads overlapping on several I/O threads.
    Counted exactly as they happen (a union of intervals summed per drain would count twice a read that
    straddles a drain)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._since = 0.0  # start of the current busy stretch (valid while _active > 0)
        self._busy = 0.0

    def begin(self) -> None:
        with self._lock:
            if self._active == 0:
                self._since = time.perf_counter()
            self._active += 1

    def end(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._busy += time.perf_counter() - self._since

    def drain(self) -> float:
        """Busy seconds since the last drain (a stretch still running counts up to now)."""
        with self._lock:
            busy, self._busy = self._busy, 0.0
            if self._active:
                now = time.perf_counter()
                busy += now - self._since
                self._since = now
            return busy


def peak_rss_bytes() -> int:
    """Peak resident set of this process. On Linux VmHWM, the high-water mark of this address space:
    ru_maxrss is carried across exec, so a process started from a big parent would report the parent's."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak if sys.platform == "darwin" else peak * 1024


def describe_stats(s: TierStats, tokens: int, calibrated_disk_gbps: float | None) -> str:
    """One line for --stats: per-token traffic by tier, I/O wait, overlap, bandwidth, peak RSS."""
    if not s.disk_bytes and not s.h2d_bytes:
        return f"[all weights resident; peak RSS {format_size(peak_rss_bytes())}]"
    per = max(tokens, 1)
    parts = [f"disk {format_size(s.disk_bytes / per)}/token"]
    if s.h2d_bytes:
        parts.append(f"host->device {format_size(s.h2d_bytes / per)}/token")
    parts.append(f"I/O wait {s.io_wait_s / per * 1000:.0f} ms/token ({s.io_wait_s / s.forward_s:.0%} of forward)"
                 if s.forward_s > 0 else "I/O wait 0 ms")
    parts.append(f"overlap η={s.overlap:.2f} (best possible {s.best_overlap:.2f})")
    if s.disk_bytes:
        bw = f"disk {s.disk_gbps:.2f} GB/s achieved"
        if calibrated_disk_gbps:
            bw += f" vs {calibrated_disk_gbps:.2f} calibrated ({s.disk_gbps / calibrated_disk_gbps:.0%})"
        parts.append(bw)
    if s.retries:
        parts.append(f"{s.retries} chunk re-reads")
    if s.repairs:
        parts.append(f"{s.repairs} corrupt unit{'s' if s.repairs > 1 else ''} rebuilt from the source")
    parts.append(f"peak RSS {format_size(peak_rss_bytes())}")
    return "[" + "; ".join(parts) + "]"
