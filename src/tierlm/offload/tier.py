"""Where a tensor lives. On a CPU-only machine DEVICE and HOST are both RAM (see DESIGN.md)."""
from __future__ import annotations

from enum import Enum


class Tier(str, Enum):
    DEVICE = "device"  # where compute happens (CUDA memory, or RAM on CPU)
    HOST = "host"  # RAM used as a staging / cache tier (pinned with CUDA)
    DISK = "disk"  # the offload store under offload_dir
