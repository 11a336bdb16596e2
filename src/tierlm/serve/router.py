"""The engine replicas' request router, run by Ray Serve inside each handle that calls them (the ingress).

Ray Serve's contract (ray.serve.request_router.RequestRouter): choose_replicas returns ranks of replicas;
Serve sends the request to the first rank's replica unless its queue is full (max_ongoing_requests), then
tries the next rank. Ranks of one replica each make the order below exact:

    policy "prefix"  the ring order for the prompt's prefix key (affinity.py), the first replica under the load
                     bound moved to the front; requests without a key (GET /metrics, a bad body) go anywhere
    policy "random"  a uniformly random order (the baseline prefix affinity is measured against)
    either           a request naming a live replica (REPLICA_HEADER) goes there

Load is each replica's in-flight requests as Serve's queue-length cache counts them (it adds one per send and
takes one off per finished request), plus the requests this router chose a replica for that Serve has not
sent yet: in a burst, many requests are routed before the first is sent, and without that tally the bound
would see zero load for all of them and send the whole burst of one hot prefix to one replica.
"""
from __future__ import annotations

import random
import time

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tierlm.serve.affinity import LOAD_FACTOR, HashRing, bounded_order
from tierlm.serve.relay import Forwarded

POLICIES = ("prefix", "random")
UNSENT_TTL_S = 10.0  # a routed request Serve never reported sent (cancelled in between) stops counting then


class AffinityRouter(RequestRouter):
    def initialize_state(self, policy: str = "prefix", load_factor: float = LOAD_FACTOR) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.load_factor = policy, load_factor
        self._ring: HashRing | None = None
        self._unsent: dict[str, tuple[str, float]] = {}  # internal request id -> (replica unique id, when)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        req = next((a for a in pending_request.args if isinstance(a, Forwarded)), None) if pending_request else None
        if req is not None and req.target in by_id:
            return [[by_id[req.target]]]
        if self.policy == "random" or req is None or req.prefix_key is None:
            order = random.sample(list(by_id), len(by_id))
        else:
            if self._ring is None or self._ring.replicas != by_id.keys():
                self._ring = HashRing(sorted(by_id))
            order = bounded_order(self._ring, req.prefix_key, self._loads(by_id), self.load_factor)
        if pending_request is not None:
            self._unsent[pending_request.metadata.internal_request_id] = (order[0], time.monotonic())
        return [[by_id[r]] for r in order]

    def _loads(self, by_id: dict[str, RunningReplica]) -> dict[str, int]:
        cache = self.replica_queue_len_cache
        loads = {rid: cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        stale = time.monotonic() - UNSENT_TTL_S
        for request_id, (rid, when) in list(self._unsent.items()):
            if when < stale:
                del self._unsent[request_id]
            elif rid in loads:
                loads[rid] += 1
        return loads

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._unsent.pop(pending_request.metadata.internal_request_id, None)  # the queue-length cache has it now

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._unsent.pop(internal_request_id, None)
