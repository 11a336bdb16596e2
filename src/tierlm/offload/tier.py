"""Where a weight unit is placed (offload/planner.py) and read from. On a CPU-only machine DEVICE and HOST
are both RAM. Not the memory ledger's tiers ("cpu", "cuda", "disk": max_memory's keys, memory/ledger.py)
nor the KV tiers below the pool (host, disk, remote: kvcache/tier_stack.py)."""
from __future__ import annotations

from enum import Enum


class Tier(str, Enum):
    DEVICE = "device"  # where compute happens (CUDA memory, or RAM on CPU)
    HOST = "host"  # RAM used as a staging / cache tier (pinned with CUDA)
    DISK = "disk"  # the offload store under offload_dir
