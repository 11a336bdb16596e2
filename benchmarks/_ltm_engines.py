"""Shared by the larger-than-memory benchmark's driver, workers and report (benchmarks/larger_than_memory.py):
the engines it can run, the prompt every engine gets and where tierlm's offload stores go. No heavy imports."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineSpec:
    kind: str  # "llama.cpp" | "tierlm"
    quant: str  # tierlm's quant ("int4" | "int8"); "" for llama.cpp
    capped: bool  # runs under the cap (and tierlm under the budget); else resident, unlimited
    floor: str | None  # the resident engine whose s/token is this one's compute floor


ENGINES = {
    "llama.cpp": EngineSpec("llama.cpp", "", True, "llama.cpp-resident"),
    "tierlm-int4": EngineSpec("tierlm", "int4", True, "tierlm-resident"),
    "tierlm-int8": EngineSpec("tierlm", "int8", True, "tierlm-resident-int8"),
    "tierlm-resident": EngineSpec("tierlm", "int4", False, None),
    "tierlm-resident-int8": EngineSpec("tierlm", "int8", False, None),
    "llama.cpp-resident": EngineSpec("llama.cpp", "", False, None),
}
DEFAULT_ENGINES = "llama.cpp,tierlm-int4,tierlm-int8,tierlm-resident"
REFERENCE = "tierlm-resident"  # greedy tokens are compared with this engine's


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    """Ids 1..n wrapping below vocab_size: tierlm.bench.prompt_ids' formula, without importing torch."""
    return [i % (vocab_size - 1) + 1 for i in range(n)]


def store_dir(offload_dir: str, quant: str, budget: str) -> Path:
    """One offload store per (quant, budget): a store is built for one placement's units."""
    return Path(offload_dir) / f"{quant}-{budget.replace('/', '_')}"

