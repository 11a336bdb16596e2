"""Tenants and their quotas: an API key names a tenant; a tenant may hold at most `running` requests and
`kv_blocks` KV blocks, and have at most `queued` more waiting (beyond that, 429). The scheduler admits the
waiting request whose tenant runs the fewest (ties: the earliest), skipping tenants at their quota, so a
tenant that floods the server waits behind its own quota and a light tenant is admitted at the next step.

    --tenant KEY=NAME:running=4,queued=32,kv_blocks=2000      (every limit optional)
"""
from __future__ import annotations

from dataclasses import dataclass

from tierlm.errors import UsageError


@dataclass(frozen=True)
class Quota:
    running: int | None = None
    queued: int | None = None
    kv_blocks: int | None = None


def parse_tenant(spec: str) -> tuple[str, str, Quota]:
    """"KEY=NAME:running=4,queued=32,kv_blocks=2000" -> (key, tenant name, quota)."""
    key, sep, rest = spec.partition("=")
    name, _, limits = rest.partition(":")
    if not sep or not key or not name:
        raise UsageError(f"--tenant {spec!r}: expected KEY=NAME[:running=N,queued=N,kv_blocks=N]")
    values: dict[str, int] = {}
    for item in filter(None, limits.split(",")):
        k, _, v = item.partition("=")
        if k not in ("running", "queued", "kv_blocks") or not v.isdigit() or int(v) < 1:
            raise UsageError(f"--tenant {spec!r}: bad limit {item!r} (running, queued, kv_blocks: integers >= 1)")
        values[k] = int(v)
    return key, name, Quota(**values)
