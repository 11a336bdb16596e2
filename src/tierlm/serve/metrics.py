"""/metrics in Prometheus' text format (prometheus-client), names in vLLM's style under `tierlm:`.

State (queues, KV blocks, counters of the engine) is read from the engine loop's snapshot at scrape time,
never from structures the engine thread is changing; latencies are histograms observed when a request
finishes. One registry per server, so several apps in one process (tests) do not collide.
"""
from __future__ import annotations

import os
import resource

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tierlm.engine.request import EngineRequest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)



def _rss() -> int:
    """Resident bytes now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _labeled(family, name: str, doc: str, label: str, values: dict[str, float]):
    """A metric family (Gauge/CounterMetricFamily) with one label, a sample per {label value: value}."""
    out = family(name, doc, labels=[label])
    for key, value in values.items():
        out.add_metric([key], value)
    return out


class _EngineCollector:
    def __init__(self, loop, metrics: "Metrics"):
        self.loop, self.metrics = loop, metrics

    def collect(self):
        s = self.loop.snapshot
        yield GaugeMetricFamily("tierlm:num_requests_running", "Requests holding KV blocks", value=s.running)
        yield GaugeMetricFamily("tierlm:num_requests_waiting", "Requests queued", value=s.waiting)
        yield _labeled(GaugeMetricFamily, "tierlm:kv_blocks", "KV pool blocks by state", "state",
                       {k: getattr(s.kv, k) for k in ("used", "cached", "free")} if s.kv is not None else {})
        if s.kv is not None:
            yield GaugeMetricFamily("tierlm:kv_cache_usage_perc", "Fraction of KV blocks in use",
                                    value=s.kv.used / s.kv.blocks if s.kv.blocks else 0.0)
            yield _labeled(GaugeMetricFamily, "tierlm:kv_tier_blocks", "Cached KV blocks held below the pool", "tier",
                           {"host": s.host_blocks, "disk": s.disk_blocks})
            moves = ("host_puts", "disk_writes", "host_restores", "disk_restores", "remote_restores", "dropped",
                     "corrupt")
            yield _labeled(CounterMetricFamily, "tierlm:kv_tier_moves", "KV blocks moved between tiers", "move",
                           {k: getattr(s.kv.tiers, k) for k in moves})
            if (r := s.kv.remote) is not None:
                yield GaugeMetricFamily("tierlm:kv_remote_up", "1 while the shared KV tier answers; 0: local tiers only",
                                        value=int(r.up))
                c = r.counters
                yield _labeled(CounterMetricFamily, "tierlm:kv_remote_blocks", "KV blocks of the shared tier", "op",
                               {"written": c.puts, "restored": c.restores, "missing": c.misses,
                                "refused": c.corrupt, "dropped": c.dropped_puts, "stale": c.stale})
                yield _labeled(CounterMetricFamily, "tierlm:kv_remote_bytes", "Bytes to and from the shared tier",
                               "direction", {"put": c.put_bytes, "get": c.get_bytes})
                yield CounterMetricFamily("tierlm:kv_remote_errors", "Shared-tier calls that failed or timed out",
                                          value=c.errors)
                yield GaugeMetricFamily("tierlm:kv_remote_rtt_seconds", "Measured round trip", value=r.rtt_s)
            yield CounterMetricFamily("tierlm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      value=s.kv.queried_tokens)
            yield CounterMetricFamily("tierlm:prefix_cache_hits", "Prompt tokens served by the prefix cache",
                                      value=s.kv.hit_tokens + s.kv.restored_tokens)
        if (a := s.host_arena) is not None:
            yield _labeled(GaugeMetricFamily, "tierlm:kv_host_arena_bytes", "The host KV tier's arena", "state",
                           {k: getattr(a, k) for k in ("capacity", "used", "free", "largest_free")})
            yield GaugeMetricFamily("tierlm:kv_host_arena_fragmentation", "1 - largest free extent / free bytes",
                                    value=a.fragmentation)
            yield GaugeMetricFamily("tierlm:kv_host_arena_utilisation", "Arena bytes in live blocks / capacity",
                                    value=a.utilisation)
        yield GaugeMetricFamily("tierlm:resident_layers", "Decoder layers held in memory (the rest stream)",
                                value=s.resident_layers)
        yield _labeled(CounterMetricFamily, "tierlm:layer_migrations", "Layers moved between memory and the stream",
                       "direction", {"demote": s.demotions, "promote": s.promotions})
        yield CounterMetricFamily("tierlm:num_preemptions", "Requests preempted", value=s.preemptions)
        yield GaugeMetricFamily("tierlm:memory_pressure_level", "0 normal, 1 elevated, 2 high, 3 critical",
                                value=s.pressure)
        yield GaugeMetricFamily("tierlm:memory_pressure_fraction", "Memory in use of the cgroup's (or machine's) limit",
                                value=s.pressure_fraction)
        yield CounterMetricFamily("tierlm:memory_pressure_transitions", "Pressure level changes",
                                  value=s.pressure_transitions)
        yield CounterMetricFamily("tierlm:engine_step_errors", "Engine steps that failed", value=s.step_errors)
        yield CounterMetricFamily("tierlm:request_errors", "Requests that ended in an error (their own or their "
                                  "step's)", value=s.failed_requests)
        yield GaugeMetricFamily("tierlm:failed_passes_in_a_row", "Forward passes failed since the last that "
                                "succeeded (/health is 503 from 3)", value=s.failed_passes_in_a_row)
        yield _labeled(CounterMetricFamily, "tierlm:bytes_streamed", "Weight bytes streamed, by tier", "tier",
                       {"disk": s.weight_traffic.disk_bytes, "host_to_device": s.weight_traffic.h2d_bytes})
        m = self.metrics
        yield CounterMetricFamily("tierlm:prompt_tokens", "Prompt tokens of finished requests", value=m.prompt_tokens)
        yield CounterMetricFamily("tierlm:generation_tokens", "Generated tokens of finished requests",
                                  value=m.generation_tokens)
        yield CounterMetricFamily("tierlm:requests", "Requests accepted", value=m.started)
        if m.ledger is not None:  # the memory ledger: thread-safe, read directly
            held = GaugeMetricFamily("tierlm:memory_reserved_bytes", "Bytes reserved in the memory ledger",
                                     labels=["owner", "tier"])
            for (owner, tier), n in m.ledger.by_owner().items():
                held.add_metric([owner, tier], n)
            yield held
            yield _labeled(GaugeMetricFamily, "tierlm:memory_budget_bytes", "The ledger's budget per tier", "tier",
                           {tier: n for tier, n in m.ledger.budgets.items() if n is not None})
        if m.bodies is not None:  # read on the event loop's thread, which alone changes it
            yield GaugeMetricFamily("tierlm:request_memory_used_bytes", "Request memory held by the bodies being "
                                    "served (of the ledger's 'requests' reservation)", value=m.bodies.used)
            yield CounterMetricFamily("tierlm:request_memory_refusals", "Requests refused (503) for request memory",
                                      value=m.bodies.refused)
        yield GaugeMetricFamily("tierlm:rss_bytes", "Resident set size of the server now", value=_rss())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        yield GaugeMetricFamily("tierlm:peak_rss_bytes", "Peak resident set size of the server", value=peak)


class Metrics:
    def __init__(self, loop, ledger=None, bodies=None):
        """bodies: the server's serve/guard.BodyBudget (the request bodies held now)."""
        self.ledger, self.bodies = ledger, bodies
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(loop, self))
        h = lambda name, doc: Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=self.registry)  # noqa: E731
        self.ttft = h("tierlm:time_to_first_token_seconds", "Time from arrival to the first token")
        self.itl = h("tierlm:inter_token_latency_seconds", "Mean gap between consecutive tokens of a request")
        self.e2e = h("tierlm:e2e_request_latency_seconds", "Time from arrival to the last token")
        self.prompt_tokens = self.generation_tokens = self.started = 0
        self.content_type = CONTENT_TYPE_LATEST

    def requests_started(self, n: int) -> None:
        self.started += n

    def requests_finished(self, reqs: list[EngineRequest]) -> None:
        for r in reqs:
            if r.out.finish_reason not in ("stop", "length"):
                continue
            m = r.out.metrics
            self.prompt_tokens += m.prompt_tokens
            self.generation_tokens += len(r.out.token_ids)
            self.ttft.observe(m.ttft_s)
            if m.decode_tokens:
                self.itl.observe(m.decode_s / m.decode_tokens)
            if r.last_token_at:
                self.e2e.observe(r.last_token_at - r.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
