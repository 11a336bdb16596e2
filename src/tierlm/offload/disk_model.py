"""Disk read bandwidth as a function of bytes in flight: what `tierlm calibrate` measures and the planner
sizes the ring and the I/O threads from. Pure functions.

A local NVMe drive reaches its bandwidth with a few MiB in flight, a networked or virtual disk may need tens
of MiB, and a single synchronous read reaches neither. The streamer keeps in flight at most
    min(io_threads × request, bytes of the loads submitted ahead)
and the loads submitted ahead are the ring's other slots, so small units (a 2 MiB layer) need a deeper ring,
not only more threads, before the disk is busy: (ring depth − 1) × unit bytes is the cap.
"""
from __future__ import annotations

from dataclasses import dataclass

SATURATION = 0.95  # "saturated": within 5% of the best measured bandwidth
MIN_IO_THREADS = 4  # threads cost no memory (reads land in the ring slot): never risk an idle disk on a noisy curve
MAX_IO_THREADS = 32


@dataclass(frozen=True)
class DiskModel:
    """Piecewise-linear bandwidth curve through measured (bytes in flight, GB/s) points, flat beyond the last
    point and proportional to the bytes in flight below the first (one request's latency dominates there)."""
    points: tuple[tuple[int, float], ...]  # ascending bytes in flight

    @staticmethod
    def flat(gbps: float) -> DiskModel:
        """No curve measured: the same bandwidth at any depth (an uncalibrated or older profile)."""
        return DiskModel(((1, gbps),))

    @staticmethod
    def of(points) -> DiskModel:
        pts = sorted((int(b), float(g)) for b, g in points if b > 0 and g > 0)
        if not pts:
            raise ValueError("a disk model needs at least one (bytes in flight, GB/s) point")
        # Monotone: more in flight never reads slower (the streamer could always leave threads idle), so a dip
        # measured at a larger depth is the disk's noise (±30% on a virtual disk), not its curve.
        best, mono = 0.0, []
        for b, g in pts:
            best = max(best, g)
            mono.append((b, best))
        return DiskModel(tuple(mono))

    @property
    def best_gbps(self) -> float:
        return max(g for _, g in self.points)

    def gbps(self, in_flight: int) -> float:
        pts = self.points
        if in_flight <= pts[0][0]:
            return pts[0][1] * max(in_flight, 1) / pts[0][0]
        for (b0, g0), (b1, g1) in zip(pts, pts[1:]):
            if in_flight <= b1:
                return g0 + (g1 - g0) * (in_flight - b0) / (b1 - b0)
        return pts[-1][1]

    def saturating_bytes(self) -> int:
        """The fewest bytes in flight that reach SATURATION × the best bandwidth (more only costs memory)."""
        target = SATURATION * self.best_gbps
        return next(b for b, g in self.points if g >= target)


def in_flight(ring_depth: int, unit_bytes: int, io_threads: int, request_bytes: int) -> int:
    """Bytes the streamer keeps in flight while compute waits: the other ring slots' loads, read
    `io_threads` requests at a time (a unit smaller than a request is one request)."""
    ahead = max(ring_depth - 1, 1) * unit_bytes
    return min(io_threads * min(request_bytes, max(unit_bytes, 1)), ahead)


def io_threads_for(model: DiskModel, unit_bytes: int, request_bytes: int) -> int:
    """Threads that put the saturating bytes in flight with requests of this unit's size (at least
    MIN_IO_THREADS: a virtual disk's curve is noisy, its saturation point may be a fluke)."""
    req = max(min(request_bytes, unit_bytes), 1)
    return max(MIN_IO_THREADS, min(MAX_IO_THREADS, -(-model.saturating_bytes() // req)))
