"""KV cache statistics: blocks by state, prefix-cache hit rate, evictions, preemptions, slot waste."""
from __future__ import annotations

from dataclasses import dataclass

from tierlm.config import format_size
from tierlm.kvcache.remote_tier import RemoteStats
from tierlm.kvcache.tier_stack import KVTierCounters


@dataclass(frozen=True)
class KVStats:
    block_size: int
    blocks: int  # in the pool
    used: int  # held by live sequences
    cached: int  # free, but still holding a cached prefix (reusable until evicted)
    free: int  # free and empty
    block_bytes: int
    hit_tokens: int  # prompt tokens served from cached blocks in the pool
    restored_tokens: int  # prompt tokens served by restoring blocks from the host/disk tiers
    queried_tokens: int  # prompt tokens looked up
    evictions: int  # cached blocks reused for other tokens
    tiers: KVTierCounters  # moves to and from the host/disk KV tiers
    preemptions: int  # sequences whose blocks were taken back (then recomputed)
    recomputed_tokens: int
    filled_slots: int  # token slots of used blocks that hold a token
    storage: str  # what the pool holds: float32, bfloat16, int8
    remote: RemoteStats | None = None  # the shared (Redis) tier, when there is one

    @property
    def hit_rate(self) -> float:
        return (self.hit_tokens + self.restored_tokens) / self.queried_tokens if self.queried_tokens else 0.0

    @property
    def waste(self) -> float:
        """Allocated-but-unused token slots / allocated slots, over the blocks live sequences hold."""
        slots = self.used * self.block_size
        return 1 - self.filled_slots / slots if slots else 0.0

    def describe(self) -> str:
        t = self.tiers
        return (f"KV ({self.storage}, {self.blocks} blocks of {self.block_size} tokens, {format_size(self.blocks * self.block_bytes)}): "
                f"{self.used} used, {self.cached} cached, {self.free} free; prefix hits {self.hit_tokens}/"
                f"{self.queried_tokens} tokens + {self.restored_tokens} restored ({self.hit_rate:.0%}); "
                f"{self.evictions} evictions (host {t.host_puts}, disk {t.disk_writes}, dropped {t.dropped}; "
                f"disk tier evicted {t.disk_evictions}, write errors {t.write_errors}); "
                f"restores host {t.host_restores} disk {t.disk_restores}, {t.recompute_chosen} recomputed by cost, "
                f"{t.corrupt} corrupt; {self.preemptions} preemptions ({self.recomputed_tokens} tokens recomputed); "
                f"waste {self.waste:.1%}" + (self._remote() if self.remote else ""))

    def _remote(self) -> str:
        r, c = self.remote, self.remote.counters
        return (f"; remote {'up' if r.up else 'DOWN'} (rtt {r.rtt_s * 1e3:.2f} ms, {r.gbps:.2f} GB/s): "
                f"{c.puts} written, {c.restores} restored, {c.misses} missing, {c.corrupt} refused, "
                f"{c.dropped_puts} writes dropped, {c.stale} reused before written, {c.errors} errors")
