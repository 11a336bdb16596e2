"""Memory pressure: how close the process is to being OOM-killed, as graded levels with hysteresis.

    normal < 80% <= elevated < 90% <= high < 95% <= critical

The fraction is read from the OS: the memory cgroup the process is in (v2 memory.current / memory.max, v1
memory.usage_in_bytes / memory.limit_in_bytes, less the inactive page cache the kernel reclaims before an
OOM kill), else the machine (1 - MemAvailable / MemTotal). A level is entered when the fraction reaches its threshold and left
only when it falls HYSTERESIS below it, so a reading hovering at a boundary does not flap. level_of is pure;
read_memory is the only part that touches the OS. The engine's responses to each level are in
engine/pressure_control.py (PressureControl.check, run by serve/loop.py with each snapshot).
"""
from __future__ import annotations

from enum import IntEnum
from pathlib import Path

THRESHOLDS = (0.80, 0.90, 0.95)  # elevated, high, critical
HYSTERESIS = 0.05


class Level(IntEnum):
    NORMAL = 0
    ELEVATED = 1
    HIGH = 2
    CRITICAL = 3


def level_of(fraction: float, previous: Level = Level.NORMAL) -> Level:
    """The level for `fraction` of the limit in use, given the level before (hysteresis on the way down)."""
    up = Level(sum(fraction >= t for t in THRESHOLDS))
    if up >= previous:
        return up
    # falling: stay at `previous` until the fraction is HYSTERESIS below its threshold, then step down as far
    # as the fraction allows with the same margin
    return Level(max(up, sum(fraction >= t - HYSTERESIS for t in THRESHOLDS[:previous])))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _cgroup_paths() -> tuple[Path, Path] | None:
    """(usage file, limit file) of this process's memory cgroup, if it has a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            return base / "memory.current", base / "memory.max"
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            return base / "memory.usage_in_bytes", base / "memory.limit_in_bytes"
    return None


def _inactive_file(stat: Path) -> int:
    """Clean page cache the kernel reclaims before any OOM kill (v2 inactive_file, v1 total_inactive_file)."""
    try:
        for line in stat.read_text().splitlines():
            key, value = line.split()
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def read_memory() -> tuple[int, int, str]:
    """(bytes in use, limit, where from): the process's memory cgroup when it has a limit, else the machine.
    A cgroup's usage counts its page cache, which fills up to the limit in normal operation: its inactive,
    reclaimable part is not pressure (the same reading `docker stats` shows)."""
    paths = _cgroup_paths()
    if paths is not None:
        used, limit = _read_int(paths[0]), _read_int(paths[1])
        if used is not None and limit is not None and limit < (1 << 60):  # v1 "no limit" is a huge number
            return max(used - _inactive_file(paths[0].with_name("memory.stat")), 0), limit, "cgroup"
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"], info["MemTotal"], "machine"
