"""Helpers shared by the benchmark scripts (run them from the repository root: `python benchmarks/X.py`)."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
import urllib.request

import torch


def _proc_field(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def machine_info() -> dict:
    mem = _proc_field("/proc/meminfo", "MemTotal")
    ram_gib = f"{int(mem.split()[0]) / 2**20:.1f} GiB" if mem != "?" else "?"
    return {"cpu": _proc_field("/proc/cpuinfo", "model name"), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "ram": ram_gib, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "loadavg_1m_at_end": os.getloadavg()[0]}


def disk_info(path: str) -> str:
    """The block device under `path`: name, size, rotational flag and filesystem, e.g. "vda 252 GiB
    (virtio, rotational=1, ext4)". Best effort: "?" parts where /sys does not say."""
    try:
        st = os.stat(path)
        dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        sys_dev = os.path.realpath(f"/sys/dev/block/{dev}")
        if os.path.exists(os.path.join(sys_dev, "partition")):
            sys_dev = os.path.dirname(sys_dev)  # a partition: its disk holds queue/ and device/
        name = os.path.basename(sys_dev)

        def read(rel: str) -> str:
            try:
                with open(os.path.join(sys_dev, rel)) as f:
                    return f.read().strip()
            except OSError:
                return "?"

        size = read("size")
        size = f"{int(size) * 512 / 2**30:.0f} GiB" if size.isdigit() else "?"
        driver = os.path.basename(os.path.realpath(os.path.join(sys_dev, "device", "driver")))
        fs = "?"
        with open("/proc/self/mountinfo") as f:  # the longest mount point containing path
            best = ""
            for line in f:
                left, right = line.split(" - ")
                mnt = left.split()[4]
                if os.path.abspath(path).startswith(mnt) and len(mnt) > len(best):
                    best, fs = mnt, right.split()[0]
        return f"{name} {size} ({driver}, rotational={read('queue/rotational')}, {fs})"
    except (OSError, ValueError, IndexError):
        return "?"


def leading_match(a: list[int], b: list[int]) -> int:
    """How many leading token ids two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_of(pid: int) -> int:
    """Resident bytes of a process now (VmRSS), 0 when it is gone."""
    v = _proc_field(f"/proc/{pid}/status", "VmRSS")
    return int(v.split()[0]) * 1024 if v != "?" else 0


def start_server(cmd: list[str], port: int, what: str, timeout_s: float = 180, **popen) -> subprocess.Popen:
    """Start a server (127.0.0.1:port) and wait until GET /v1/models answers 200; RuntimeError if it exits or
    does not answer within timeout_s (then it is killed)."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, **popen)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{what} server did not start")


def scrape_metrics(port: int) -> dict[str, float]:
    """tierlm's /metrics on 127.0.0.1:port as {"name{labels}": value} (its tierlm: series only)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line.startswith("tierlm:") and " " in line)}
