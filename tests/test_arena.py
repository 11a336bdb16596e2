"""The host-tier arena: best fit, coalescing, invariants under random traffic, pages handed back by trim(),
and the host KV tier on top of it (LRU push-out, exact payloads, variable sizes under zstd)."""
from __future__ import annotations

import os
import random

import pytest

from tierlm.kvcache.block_file import StoredBlock
from tierlm.kvcache.host_tier import HostTier
from tierlm.kvcache.arena import ALIGN, Arena


def test_best_fit_and_coalescing():
    a = Arena(1 << 20)
    x, y, z, w = (a.alloc(n) for n in (1000, 5000, 3000, 100))
    a.free(x)  # a 1024 B hole at the front
    a.free(z)  # a 3008 B hole between y and w
    assert a.alloc(900) == x  # best fit: the smallest hole that fits, not the first or the last
    assert a.alloc(2900) == z
    a.check()
    for off in (x, y, z, w):
        a.free(off)
    a.check()
    s = a.stats()
    assert s.used == 0 and s.free_extents == 1 and s.largest_free == a.capacity and s.fragmentation == 0.0
    assert a.alloc(a.capacity + 1) is None and a.stats().failed == 1


def test_random_traffic_keeps_the_invariants_and_reports_fragmentation():
    rng = random.Random(7)
    a = Arena(4 << 20)
    live: dict[int, bytes] = {}
    for step in range(3000):
        if live and (rng.random() < 0.45 or a.stats().utilisation > 0.9):
            off = rng.choice(list(live))
            assert a.read(off, len(live[off])) == live.pop(off)  # nothing written elsewhere overlapped it
            a.free(off)
        else:
            data = rng.randbytes(rng.randint(1, 200_000))
            off = a.alloc(len(data))
            if off is None:
                continue
            assert off % ALIGN == 0
            a.write(off, data)
            live[off] = data
        if step % 100 == 0:
            a.check()
    s = a.stats()
    assert 0.0 < s.fragmentation < 1.0 and s.allocations == len(live)
    assert s.fragmentation == pytest.approx(1 - s.largest_free / s.free)
    with pytest.raises(ValueError):
        a.write(next(iter(live)), b"x" * (max(len(v) for v in live.values()) + 10_000_000))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_trim_hands_free_pages_back():
    a = Arena(64 << 20)
    offs = [a.alloc(1 << 20) for _ in range(64)]
    for off in offs:
        a.write(off, b"\x01" * (1 << 20))  # commit every page
    full = _rss()
    for off in offs[:48]:
        a.free(off)
    assert _rss() > full - (8 << 20)  # free() alone keeps the pages (reused by the next alloc)
    assert a.trim() >= 47 << 20
    assert _rss() < full - (40 << 20)
    assert a.read(offs[60], 4) == b"\x01" * 4  # live blocks are untouched
    a.close()


def _block(i: int, n: int, rng: random.Random) -> StoredBlock:
    # KV-like payloads: compressible to varying degrees, so zstd gives variable sizes
    payload = bytes(rng.randrange(4) for _ in range(n // 2)) + rng.randbytes(n - n // 2)
    return StoredBlock(i.to_bytes(16, "big"), b"\0" * 16, (i, i + 1), payload)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_host_tier_pushes_out_oldest_and_returns_exact_payloads(codec, tmp_path):
    if codec == "zstd":
        pytest.importorskip("zstandard")
    rng = random.Random(3)
    tier = HostTier(1 << 20, codec, log=tmp_path / "log")
    blocks = [_block(i, 96_000, rng) for i in range(40)]
    pushed: list[StoredBlock] = []
    for b in blocks:
        stored, out = tier.put(b)
        assert stored
        pushed += out
        tier.arena.check()
    assert tier.used <= tier.limit
    assert [b.hash for b in pushed] == [b.hash for b in blocks[:len(pushed)]]  # LRU: oldest first
    assert all(p.payload == b.payload for p, b in zip(pushed, blocks))
    held = blocks[len(pushed):]
    assert len(tier) == len(held) and (codec == "zstd") == (len(held) > (1 << 20) // 96_000)  # zstd packs more
    got = tier.take(held[0].hash, held[0].tokens)
    assert got == held[0] and tier.take(held[1].hash, (0,)) is None  # another prefix: not taken
    out = tier.set_limit(0)
    assert len(out) == len(held) - 1 and tier.used == 0 and tier.arena.stats().free_extents == 1
    tier.close()
    lines = (tmp_path / "log").read_text().splitlines()
    assert sum(x.startswith("p ") for x in lines) == 40 == sum(x.startswith("f ") for x in lines)
