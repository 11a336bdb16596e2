"""Helpers shared by the benchmark scripts (run them from the repository root: `python benchmarks/X.py`)."""
from __future__ import annotations

import os
import platform

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
