"""A remote host's network, simulated on one machine (benchmarks): the remote tier's URL may carry `cap_gbps=X`
and `rtt_ms=Y`, and its client then holds each transfer to X GB/s and adds Y ms per round trip."""
from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

SIM_PARAMS = ("cap_gbps", "rtt_ms")


@dataclass(frozen=True)
class SimLink:
    cap_gbps: float | None = None  # None: the real link's bandwidth
    extra_rtt_s: float = 0.0

    def seconds(self, nbytes: int) -> float:
        """The time a transfer of nbytes takes on the simulated network, 0 without one."""
        return self.extra_rtt_s + (nbytes / (self.cap_gbps * 1e9) if self.cap_gbps else 0.0)

    def hold(self, t0: float, nbytes: int) -> None:
        """Hold a transfer that started at perf_counter() t0 to the simulated network, when there is one."""
        if want := self.seconds(nbytes):
            time.sleep(max(0.0, t0 + want - time.perf_counter()))


def split_url(url: str) -> tuple[str, SimLink]:
    """(the URL redis-py takes, the simulated link its parameters asked for)."""
    u = urlparse(url)
    query = parse_qsl(u.query)
    sim = {k: float(v) for k, v in query if k in SIM_PARAMS}
    rest = urlencode([(k, v) for k, v in query if k not in SIM_PARAMS])
    return urlunparse(u._replace(query=rest)), SimLink(sim.get("cap_gbps"), sim.get("rtt_ms", 0.0) / 1e3)
