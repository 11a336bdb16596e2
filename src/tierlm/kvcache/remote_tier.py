"""The remote KV tier: blocks in a Redis shared by replicas (and machines), below host and disk.

    key   NAMESPACE:SALT64:HASH   HASH = the block's chain hash (its whole prefix, under the salt: model content
                                  fingerprint, KV format, block size, numerics); SALT64 groups one model's keys
    value encode_block(...)       the disk tier's self-describing, checksummed format, salt digest in the header,
                                  sealed with kv_remote_secret when there is one (kvcache/block_mac.py)

Reads are batched: a prefix hit asks EXISTS for all its blocks in one pipeline (one round trip), then MGETs them
in batches of at most FETCH_BYTES (a few round trips); each value is verified (the MAC first, then checksum, hash,
tokens, salt), and a miss, an evicted key or a bad value means recompute from there. Without a secret the tier
trusts anyone who can write to the Redis (warned at start): the checksum catches accidents, not forgers. Writes
go through a bounded queue to one writer thread that pipelines SETs: blocks are offered when registered (a prefix
one replica computed is visible to the others at once) as an Offer the writer reads from the pool when it gets
to it (the engine thread neither copies nor waits; a block the pool reused meanwhile is skipped, never written
torn: its generation is checked before and after the read); a full queue drops the offer (counted). Redis down
or slow (timeouts) turns the tier off for a back-off (1 s doubling to 60 s): local tiers only, a warning, `up` = 0
in the metrics, and no failed request. Eviction is Redis's (maxmemory + allkeys-lru).

Cost: restore vs recompute uses the measured round-trip time and bandwidth (a probe at start, then every fetch).
For benchmarks, the URL may carry `cap_gbps=X` and `rtt_ms=Y` (a remote host's network simulated: sim_link.py).
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import xxhash

from tierlm.kvcache.block_file import CorruptBlockError, StoredBlock, decode_block, encode_block
from tierlm.kvcache.block_mac import BlockSeal, ForgedBlockError
from tierlm.kvcache.sim_link import split_url
from tierlm.kvcache.tier_protocol import Wanted

log = logging.getLogger("tierlm.kv")
FETCH_BYTES = 32 << 20  # values fetched per MGET (bounds the transient memory of a restore)
WRITE_BYTES = 32 << 20  # blocks read and sent per pipeline by the writer
QUEUE_BLOCKS = 4096  # offers waiting for the writer (no payload: it is read when written); past it: dropped
TIMEOUT_S = 0.5  # a Redis slower than this per call is treated as down
BACKOFF_S = (1.0, 60.0)
REFUSED_LOG_S = 60.0  # refused values are logged at most once a minute: a forger could otherwise fill the log


def reserved_bytes(block_bytes: int) -> int:
    """Host memory the tier may hold at once: one write batch and one fetch batch (the ledger's
    `kv_remote` reservation; the planner leaves room for it under a budget)."""
    return max(WRITE_BYTES, block_bytes) + max(FETCH_BYTES, block_bytes)


@dataclass(frozen=True)
class Offer:
    """A registered block to write through. `read` returns its payload while the pool block still holds this
    prefix, else None; the writer calls it, so the copy is off the engine's thread too."""
    hash: bytes
    parent: bytes
    tokens: tuple[int, ...]
    read: Callable[[], bytes | None]


@dataclass
class RemoteCounters:
    puts: int = 0  # blocks written
    put_bytes: int = 0
    dropped_puts: int = 0  # write-through queue full, or Redis down
    stale: int = 0  # reused by the pool before the writer got to them (not written)
    restores: int = 0
    get_bytes: int = 0
    misses: int = 0  # asked for, absent (never written, or evicted by Redis)
    corrupt: int = 0  # present but failed verification (another model, a torn or flipped value, forged)
    forged: int = 0  # of those, failed the MAC (kv_remote_secret): another secret, another key's value, forged
    errors: int = 0  # calls that failed or timed out (the tier went down for a back-off)


@dataclass(frozen=True)
class RemoteStats:
    """A snapshot for /metrics and stats lines."""
    up: bool
    rtt_s: float
    gbps: float
    counters: RemoteCounters


class RemoteTier:
    name = "remote"

    def __init__(self, url: str, namespace: str, storage: str, salt: bytes, codec: str = "none",
                 block_bytes: int = 0, secret: str | None = None):
        import redis  # a core dependency; imported here so tierlm starts without touching it when unused

        self.url, self.storage, self.salt, self.codec = url, storage, salt, codec
        self.seal = BlockSeal(secret)
        if not self.seal.enabled:
            log.warning("KV remote tier %s has no kv_remote_secret: it trusts anyone who can write to this Redis (they "
                        "can change every replica's answers); set $TIERLM_KV_REMOTE_SECRET on all replicas", url)
        self._quiet_until = 0.0  # refused values are not logged again before then
        clean, self.link = split_url(url)
        self._errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(clean, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self.prefix = f"{namespace}:{xxhash.xxh3_64_hexdigest(salt)}:".encode()
        self.counters = RemoteCounters()
        self.rtt_s, self.gbps = 1e-3, 1.0  # until measured
        self.up, self._down_until, self._backoff = True, 0.0, BACKOFF_S[0]
        self.block_bytes = max(block_bytes, 1)  # a block's payload: MGET batches stay within FETCH_BYTES
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="tierlm-kv-remote", daemon=True)
        self._writer.start()
        self.probe()

    def stats(self) -> RemoteStats:
        return RemoteStats(self.up, self.rtt_s, self.gbps, replace(self.counters))

    def key(self, h: bytes) -> bytes:
        return self.prefix + h.hex().encode()

    # --- health -----------------------------------------------------------------------------------------
    def _usable(self) -> bool:
        if self.up:
            return True
        if time.monotonic() < self._down_until:
            return False
        self.up = True  # try again; the next failure doubles the back-off
        log.warning("KV remote tier %s: retrying", self.url)
        return True

    def _failed(self, e: Exception) -> None:
        self.counters.errors += 1
        if self.up:
            log.warning("KV remote tier %s unreachable (%s): local tiers only for %.0f s", self.url,
                        type(e).__name__, self._backoff)
        self.up = False
        self._down_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_S[1])

    def _ok(self) -> None:
        self._backoff = BACKOFF_S[0]

    def probe(self) -> None:
        """Measure the round trip (median of 5 PINGs) and the bandwidth (a 4 MiB value written and read back;
        a simulated network is added to the measurement, not slept through)."""
        try:
            rtts = []
            for _ in range(5):
                t0 = time.perf_counter()
                self.client.ping()
                rtts.append(time.perf_counter() - t0 + self.link.seconds(0))
            self.rtt_s = sorted(rtts)[2]
            data, k = os.urandom(4 << 20), self.prefix + b"probe:" + os.urandom(4).hex().encode()
            t0 = time.perf_counter()
            self.client.set(k, data, ex=60)
            back = self.client.get(k)
            dt = time.perf_counter() - t0 + 2 * self.link.seconds(len(data))
            self.client.delete(k)
            if back == data:
                self.gbps = 2 * len(data) / max(dt - 2 * self.rtt_s, 1e-6) / 1e9
            self._ok()
        except self._errors as e:
            self._failed(e)

    # --- the tier protocol ------------------------------------------------------------------------------
    def cost(self, nbytes: int, count: int) -> float:
        if not count:
            return 0.0
        trips = 1 + math.ceil(count * nbytes / FETCH_BYTES)  # EXISTS, then the MGETs
        return trips * self.rtt_s + count * nbytes / (self.gbps * 1e9)

    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        if not hashes or not self._usable():
            return [False] * len(hashes)
        try:
            t0 = time.perf_counter()
            pipe = self.client.pipeline(transaction=False)
            for h in hashes:
                pipe.exists(self.key(h))
            found = [bool(n) for n in pipe.execute()]
            self.link.hold(t0, 0)
            self.rtt_s = 0.8 * self.rtt_s + 0.2 * (time.perf_counter() - t0)
            self._ok()
            return found
        except self._errors as e:
            self._failed(e)
            return [False] * len(hashes)

    def get_many(self, wanted: Sequence[Wanted]) -> list[StoredBlock | None]:
        """Fetch `wanted` in MGETs of at most FETCH_BYTES of payload, each value verified and let go as it is
        decoded; a failure leaves the rest None. KVTiers.fetch asks for at most FETCH_BYTES at a time, so one
        call is one MGET and its blocks reach the pool before the next."""
        out: list[StoredBlock | None] = [None] * len(wanted)
        per = max(1, FETCH_BYTES // self.block_bytes)
        for start in range(0, len(wanted), per):
            part = wanted[start:start + per]
            if not self._usable():
                return out
            try:
                t0 = time.perf_counter()
                values = self.client.mget([self.key(h) for h, _ in part])
                got = sum(len(v) for v in values if v)
                self.link.hold(t0, got)
                dt = time.perf_counter() - t0
                self._ok()
            except self._errors as e:
                self._failed(e)
                return out
            if got > (1 << 20):  # a transfer large enough to measure bandwidth by
                self.gbps = 0.7 * self.gbps + 0.3 * got / max(dt - self.rtt_s, 1e-6) / 1e9
            self.counters.get_bytes += got
            for i, (h, tokens) in enumerate(part):
                out[start + i], values[i] = self._verify(h, tokens, values[i]), None
        return out

    def _verify(self, h: bytes, tokens: tuple[int, ...], value: bytes | None) -> StoredBlock | None:
        """The block `value` holds, or None: absent, or refused (its MAC is checked before it is decoded, and
        nothing refused reaches any tier: the caller recomputes from here)."""
        if value is None:
            self.counters.misses += 1
            return None
        try:
            block = decode_block(self.seal.open(self.key(h), value), self.storage, h, self.salt)
        except CorruptBlockError as e:
            self._refused(e)
            return None
        if block.tokens != tokens:
            self._refused(CorruptBlockError(f"{h.hex()}: tokens of another prefix"))
            return None
        self.counters.restores += 1
        return block

    def _refused(self, e: CorruptBlockError) -> None:
        self.counters.corrupt += 1
        self.counters.forged += isinstance(e, ForgedBlockError)
        if (now := time.monotonic()) >= self._quiet_until:
            self._quiet_until = now + REFUSED_LOG_S
            log.warning("KV remote tier: %s (recomputed; %d refused so far, %d by their MAC; quiet for %.0f s)",
                        e, self.counters.corrupt, self.counters.forged, REFUSED_LOG_S)
    def offer(self, o: Offer) -> None:
        """Queue a block for writing (never waits: a full queue or a down Redis drops it, counted)."""
        if not self.up or self._queue.qsize() >= QUEUE_BLOCKS:
            self.counters.dropped_puts += 1
            return
        self._queue.put(o)

    def put(self, block: StoredBlock) -> None:
        self.offer(Offer(block.hash, block.parent, block.tokens, lambda: block.payload))

    # --- the writer -------------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            try:
                ready: list[tuple[bytes, bytes]] = []  # (key, encoded value): a block's payload is dropped once
                nbytes = 0  # encoded, so a batch holds at most max(WRITE_BYTES, one block) (reserved_bytes)
                for o in batch:
                    if o is None:
                        continue
                    if not self._usable():
                        self.counters.dropped_puts += 1
                        continue
                    payload = o.read()
                    if payload is None:
                        self.counters.stale += 1
                        continue
                    key = self.key(o.hash)
                    value = self.seal.seal(key, encode_block(StoredBlock(o.hash, o.parent, o.tokens, payload),
                                                             self.storage, self.codec, self.salt))
                    del payload
                    if ready and nbytes + len(value) > WRITE_BYTES:
                        self._write(ready)
                        ready, nbytes = [], 0
                    ready.append((key, value))
                    nbytes += len(value)
                if ready:
                    self._write(ready)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return

    def _write(self, items: list[tuple[bytes, bytes]]) -> None:
        """One pipeline of SETs (redis-py sends large values as they are, without copying them again)."""
        nbytes = sum(len(v) for _, v in items)
        try:
            t0 = time.perf_counter()
            pipe = self.client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value)
            pipe.execute()
            self.link.hold(t0, nbytes)
            self._ok()
        except self._errors as e:
            self._failed(e)
            self.counters.dropped_puts += len(items)
            return
        self.counters.puts += len(items)
        self.counters.put_bytes += nbytes

    def flush(self) -> None:
        """Wait until every queued write is done (or dropped)."""
        self._queue.join()

    def close(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=30)
        self.client.close()
