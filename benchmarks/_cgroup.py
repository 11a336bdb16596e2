"""A memory cgroup (v1) per benchmark worker, and page-cache eviction, for the larger-than-memory benchmarks.

In cgroup v1 the page cache a process faults in is charged to its cgroup, so `memory.limit_in_bytes` caps
what a mmap-based engine can keep cached as well as its anonymous memory: "the machine has CAP of RAM".

    cg = MemoryCgroup.create(limit=2 << 30)       # /sys/fs/cgroup/memory/tierlm-bench-PID
    proc = subprocess.Popen(cg.wrap([sys.executable, ...]))   # joins the cgroup before exec
    proc.wait(); print(cg.peak_bytes(), cg.oom_kills()); cg.remove()

Only root can create cgroups; `unavailable_reason()` says why not (the caller then runs without a cap).
Files are evicted from the page cache with posix_fadvise(DONTNEED) (pages still mapped by a live process
stay: evict after the worker exits) and `fincore` tells what is still cached.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
PREFIX = "tierlm-bench-"


def unavailable_reason(root: Path = CGROUP_V1_MEMORY) -> str | None:
    """None when a v1 memory cgroup can be created under `root`, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not (root / "memory.limit_in_bytes").is_file():
        return f"no cgroup v1 memory controller at {root}"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(root: Path = CGROUP_V1_MEMORY) -> list[str]:
    """rmdir the empty tierlm-bench-PID cgroups whose benchmark process is gone (a run killed with SIGKILL)."""
    removed = []
    for d in root.glob(PREFIX + "*"):
        pid = d.name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                d.rmdir()
                removed.append(d.name)
            except OSError:
                pass  # still has processes: not ours to kill
    return removed


class MemoryCgroup:
    """One v1 memory cgroup. Lifetime: create() ... remove() (rmdir), by the process that created it."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, limit: int | None, name: str | None = None, root: Path = CGROUP_V1_MEMORY) -> "MemoryCgroup":
        """A fresh cgroup `root/name` (default tierlm-bench-PID; an old empty one is replaced) with
        memory.limit_in_bytes = `limit` (None: no limit, still counted). Swap is capped too when the kernel
        accounts it (memory.memsw), so the cap cannot be dodged by swapping."""
        path = root / (name or f"{PREFIX}{os.getpid()}")
        if path.exists():
            path.rmdir()  # fails (OSError) when a process is still inside: never reuse a busy group
        path.mkdir()
        cg = cls(path)
        try:
            if limit is not None:
                cg._write("memory.limit_in_bytes", limit)
                if (path / "memory.memsw.limit_in_bytes").exists():
                    try:
                        cg._write("memory.memsw.limit_in_bytes", limit)
                    except OSError:
                        pass  # swap accounting off: memory.limit_in_bytes alone
        except BaseException:
            cg.remove()
            raise
        return cg

    def _write(self, name: str, value: int | str) -> None:
        (self.path / name).write_text(f"{value}\n")

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run by a shell that first moves itself into this cgroup, then execs argv (same pid), so the
        command is charged from its first page."""
        return ["sh", "-c", f'echo $$ > "{self.path}/cgroup.procs" && exec "$@"', "sh", *argv]

    def limit_bytes(self) -> int:
        return int(self._read("memory.limit_in_bytes"))

    def peak_bytes(self) -> int:
        """memory.max_usage_in_bytes: high-water mark of anonymous memory + page cache charged here."""
        return int(self._read("memory.max_usage_in_bytes"))

    def failcnt(self) -> int:
        """How many times a charge hit the limit (reclaim was forced)."""
        return int(self._read("memory.failcnt"))

    def oom_kills(self) -> int | None:
        """Processes the OOM killer killed in this cgroup (None on kernels without the counter)."""
        for line in self._read("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return None

    def stat(self) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in self._read("memory.stat").splitlines())}

    def procs(self) -> list[int]:
        return [int(p) for p in self._read("cgroup.procs").split()]

    def remove(self, timeout_s: float = 5.0) -> None:
        """rmdir, retrying briefly while an exiting process is still listed. Idempotent."""
        deadline = time.monotonic() + timeout_s
        while self.path.exists():
            try:
                self.path.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# --- page cache ----------------------------------------------------------------------------------------
def _files(paths: list[Path]) -> list[Path]:
    out = []
    for root in paths:
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out += [p for p in sorted(root.rglob("*")) if p.is_file()]
    return out


def evict(paths: list[Path], drop_caches: bool = False) -> None:
    """Drop every file under `paths` from the page cache (posix_fadvise DONTNEED; unmapped pages only).
    drop_caches: also `echo 1 > /proc/sys/vm/drop_caches` (root; the whole machine's clean page cache)."""
    for f in _files(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def cached_bytes(paths: list[Path]) -> int | None:
    """Bytes of the files under `paths` now in the page cache (fincore); None when fincore is missing."""
    files = [str(f) for f in _files(paths)]
    if not files:
        return 0
    try:
        out = subprocess.run(["fincore", "--raw", "--noheadings", "--bytes", "--output", "RES", *files],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(x) for x in out.split())
