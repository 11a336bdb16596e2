"""Memory budgets as users write them: {"cuda:0": "4GiB", "cpu": "16GiB"} or "cuda:0=4GiB,cpu=16GiB"."""
from __future__ import annotations

from dataclasses import dataclass

from tierlm.config import format_size, parse_size
from tierlm.errors import UsageError


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes tierlm may use per memory. None = no limit. The runtime's fixed overhead (Python, torch,
    tokenizer) is outside the budget; see README "Honest budgets"."""

    cpu: int | None = None
    device: int | None = None  # CUDA memory of `device_name`
    device_name: str | None = None  # "cuda:0"

    @property
    def limited(self) -> bool:
        return self.cpu is not None or self.device is not None

    @classmethod
    def parse(cls, spec: "str | dict | MemoryBudget | None") -> "MemoryBudget":
        if spec is None or isinstance(spec, MemoryBudget):
            return spec or cls()
        if isinstance(spec, str):
            pairs = []
            for part in filter(None, (p.strip() for p in spec.split(","))):
                key, sep, value = part.partition("=")
                if not sep:
                    raise UsageError(f"--max-memory entry {part!r} is not KEY=SIZE (example: cpu=1GiB)")
                pairs.append((key.strip(), value.strip()))
        elif isinstance(spec, dict):
            pairs = list(spec.items())
        else:
            raise UsageError(f"max_memory must be a dict or a string, got {type(spec).__name__}")
        cpu = device = name = None
        for key, value in pairs:
            size = parse_size(value)
            if isinstance(key, int) or str(key).isdigit():  # Accelerate writes GPU 0 as 0
                key = f"cuda:{key}"
            key = str(key).lower()
            if key == "cpu":
                cpu = size
            elif key == "cuda" or key.startswith("cuda:"):
                if name is not None:
                    raise UsageError("max_memory: one CUDA device at a time")
                device, name = size, "cuda:0" if key == "cuda" else key
            else:
                raise UsageError(f"max_memory: unknown memory {key!r} (use cpu, cuda or cuda:N)")
        return cls(cpu=cpu, device=device, device_name=name)

    def __str__(self) -> str:
        parts = [f"{self.device_name}={format_size(self.device)}"] if self.device is not None else []
        if self.cpu is not None:
            parts.append(f"cpu={format_size(self.cpu)}")
        return ",".join(parts) or "unlimited"
