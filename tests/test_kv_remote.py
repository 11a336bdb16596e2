"""The shared KV tier on a real redis-server: keys that mean the content (the same model in two places shares
them, another model never does), a prefix one engine computed restored by another in a couple of round trips
with identical outputs, and every failure — a missing, corrupt or foreign value, Redis down or stalled, a slow
link — meaning recompute or local tiers only, never a wrong or failed request."""
from __future__ import annotations

import shutil
import threading

import pytest
import redis

from tierlm import LLM, SamplingParams
from tierlm.cli import main
from tierlm.engine.args import EngineArgs
from tierlm.errors import UsageError
from tierlm.kvcache.block_file import StoredBlock, encode_block
from tierlm.kvcache.block_mac import MAC_MAGIC

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
P = list(range(10, 51))  # 41 tokens: 10 full blocks of 4 can be restored (the last token is always computed)
BLOCKS = 10


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tierlm" / "fingerprints.json"


def _engine(path, **kw) -> LLM:
    return LLM(path, progress=False, block_size=4, threads=1, **kw)


def _keys(url: str) -> list[bytes]:
    c = redis.Redis.from_url(url)
    try:
        return sorted(c.scan_iter(match=b"tierlm:*", count=1000))
    finally:
        c.close()


def test_same_model_in_two_places_shares_keys_another_never(tiny_models, tmp_path, isolated_cache):
    src = tiny_models["llama_gqa_tied"].path
    one, two = shutil.copytree(src, tmp_path / "one"), shutil.copytree(src, tmp_path / "two")
    a, b = _engine(one), _engine(two)
    assert a.kv.manager.salt == b.kv.manager.salt  # another path and mtime: the same content, the same keys
    assert isolated_cache.exists() and len(__import__("json").loads(isolated_cache.read_text())) >= 2
    other = _engine(tiny_models["qwen2"].path)
    assert other.kv.manager.salt != a.kv.manager.salt
    (two / "model.safetensors").write_bytes((two / "model.safetensors").read_bytes()[:-1] + b"\x01")  # one byte
    assert _engine(two).kv.manager.salt != a.kv.manager.salt
    # the salt holds the KV format as resolved on this hardware, not the user's "auto"
    assert _engine(one, kv_dtype="float32").kv.manager.salt == a.kv.manager.salt  # auto = fp32 on a CPU
    assert _engine(one, kv_dtype="bfloat16").kv.manager.salt != a.kv.manager.salt
    assert LLM(one, progress=False, block_size=8).kv.manager.salt != a.kv.manager.salt


@pytest.mark.slow
def test_the_embedded_gguf_copied_elsewhere_keeps_its_keys(tmp_path, isolated_cache):
    from tierlm.weights.embedded import embedded_model_path
    copy = tmp_path / "copy.gguf"
    shutil.copy(embedded_model_path(), copy)
    assert LLM(None, progress=False).kv_salt(*_kv_args()) == LLM(copy, progress=False).kv_salt(*_kv_args())


def _kv_args():
    import torch
    return torch.float32, 16


@pytest.mark.parametrize("secret", [None, "shared by the replicas"])  # sealed values restore as plain ones
def test_a_prefix_computed_by_one_engine_is_restored_by_another(tiny_models, tmp_path, redis_url, isolated_cache,
                                                                secret):
    src = tiny_models["llama_gqa_tied"].path
    want = _engine(src, enable_prefix_caching=False).generate([P], GREEDY)[0].token_ids
    a = _engine(src, kv_remote=redis_url, kv_remote_secret=secret)
    assert a.generate([P], GREEDY)[0].token_ids == want
    a.kv.tiers.flush()
    # written through when registered: nothing was evicted, yet the other replica can see every full block
    assert a.kv.stats().evictions == 0 and len(_keys(redis_url)) == a.kv.tiers.remote.counters.puts >= BLOCKS
    values = redis.Redis.from_url(redis_url).mget(_keys(redis_url))
    assert all(v.startswith(MAC_MAGIC) == (secret is not None) for v in values)
    b = _engine(shutil.copytree(src, tmp_path / "b"), kv_remote=redis_url, kv_remote_secret=secret)
    stats = redis.Redis.from_url(redis_url)
    stats.config_resetstat()  # count B's restore only (not its bandwidth probe)
    assert b.generate([P], GREEDY)[0].token_ids == want
    assert b.kv.restored_tokens == 4 * BLOCKS and b.kv.tiers.counters.remote_restores == BLOCKS
    calls = {k: v["calls"] for k, v in stats.info("commandstats").items()}
    assert calls.get("cmdstat_mget") == 1 and "cmdstat_get" not in calls  # fetched in one round trip
    assert "remote up" in b.kv_stats().describe() and b.kv.tiers.remote.counters.corrupt == 0
    c = _engine(src, kv_remote=redis_url, kv_remote_secret=secret, kv_remote_namespace="other")  # another deployment's namespace
    assert c.generate([P], GREEDY)[0].token_ids == want and c.kv.restored_tokens == 0


def test_a_block_reused_before_the_writer_reads_it_is_never_written(tiny_models, isolated_cache):
    """Write-through reads the pool block on the writer's thread, later: only while it holds the offered prefix."""
    e = _engine(tiny_models["llama_gqa_tied"].path, kv_memory=None)
    e.generate([P], GREEDY)
    kv = e.kv
    block, h = next(iter(kv.manager.hash_of.items()))
    read = kv.reader(block, h)
    assert read() == kv.pool.read_block(block)
    gen, taken = kv.manager.generation[block], []
    while kv.manager.generation[block] == gen:
        taken.append(kv._allocate())  # free blocks, oldest first, until ours is reused for other tokens
    assert read() is None and kv.reader(block, h)() is None
    kv.manager.release_all(taken)


@pytest.mark.parametrize("damage", ["evicted", "corrupt", "foreign"])
def test_missing_corrupt_or_foreign_values_mean_recompute(tiny_models, redis_url, isolated_cache, damage):
    src = tiny_models["qwen2"].path
    a = _engine(src, kv_remote=redis_url)
    want = a.generate([P], GREEDY)[0].token_ids
    a.kv.tiers.flush()
    from tierlm.kvcache.blocks import ROOT_HASH, block_hash
    salt, hashes, parent = a.kv.manager.salt, [], ROOT_HASH
    for i in range(BLOCKS):
        parent = block_hash(parent, tuple(P[4 * i:4 * i + 4]), salt)
        hashes.append(parent)
    bad = 4  # blocks 0-3 restore, block 4 is damaged: recompute from there
    key = a.kv.tiers.remote.key(hashes[bad])
    r = redis.Redis.from_url(redis_url)
    if damage == "evicted":
        r.delete(key)
    elif damage == "corrupt":
        value = bytearray(r.get(key))
        value[-9] ^= 0x10
        r.set(key, bytes(value))
    else:  # a block of another model stored under this key: its salt digest does not match
        block = StoredBlock(hashes[bad], hashes[bad - 1], tuple(P[16:20]), b"\0" * len(a.kv.pool.read_block(0)))
        r.set(key, encode_block(block, a.kv.tiers.storage, "none", b"another model"))
    b = _engine(src, kv_remote=redis_url)
    assert b.generate([P], GREEDY)[0].token_ids == want
    assert b.kv.restored_tokens == 4 * bad
    counters = b.kv.tiers.remote.counters
    assert counters.corrupt == (damage != "evicted")  # an evicted key is simply not found (EXISTS)


def test_redis_down_means_local_tiers_only(tiny_models, isolated_cache):
    from serve_helpers import free_port
    src = tiny_models["llama_gqa_tied"].path
    want = _engine(src).generate([P], GREEDY)[0].token_ids
    e = _engine(src, kv_remote=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert e.generate([P], GREEDY)[0].token_ids == want
    remote = e.kv.tiers.remote
    assert not remote.up and remote.counters.errors >= 1 and "remote DOWN" in e.kv_stats().describe()


@pytest.mark.slow
def test_a_stalled_redis_costs_one_timeout_not_a_request(tiny_models, redis_url, isolated_cache):
    src = tiny_models["llama_gqa_tied"].path
    e = _engine(src, kv_remote=redis_url)
    want = _engine(src).generate([P], GREEDY)[0].token_ids
    pauser = redis.Redis.from_url(redis_url)
    pauser.client_pause(3000, all=True)  # every command waits 3 s: the engine's calls time out after 0.5 s
    try:
        done = []
        t = threading.Thread(target=lambda: done.append(e.generate([P], GREEDY)[0].token_ids))
        t.start()
        t.join(timeout=2.5)
        assert done == [want]  # finished while Redis was still stalled
        assert not e.kv.tiers.remote.up and e.kv.tiers.remote.counters.errors >= 1
    finally:
        pauser.client_unpause()


def test_a_slow_link_makes_recomputing_the_cheaper_choice(tiny_models, redis_url, isolated_cache):
    src = tiny_models["llama_gqa_tied"].path
    a = _engine(src, kv_remote=redis_url)
    want = a.generate([P], GREEDY)[0].token_ids
    a.kv.tiers.flush()
    slow = _engine(src, kv_remote=redis_url + "?cap_gbps=0.0001&rtt_ms=50")  # 100 kB/s, 50 ms a round trip
    assert slow.kv.tiers.remote.gbps < 2e-4 and slow.kv.tiers.remote.rtt_s >= 0.05
    slow.generate([list(range(300, 341))], GREEDY)  # a prefill measures the recompute side
    assert slow.generate([P], GREEDY)[0].token_ids == want
    assert slow.kv.restored_tokens == 0 and slow.kv.tiers.counters.recompute_chosen == 1


def test_bad_remote_urls_are_one_line_errors(capsys):
    for url in ("http://127.0.0.1:6379", "redis://", "redis://host:port/0", "redis://h:1/x"):
        with pytest.raises(UsageError):
            EngineArgs(kv_remote=url).check()
    assert main(["generate", "--prompt", "hi", "--kv-remote", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kv_remote" in err[0]


@pytest.mark.slow
def test_the_shared_tier_is_inside_the_budget(redis_url, isolated_cache, tmp_path):
    """Its queue and fetch batch are planned (the embedded model's plan fills a 200 MiB budget: the pool gives
    way) and reserved in the ledger."""
    from tierlm.kvcache.remote_tier import reserved_bytes
    budget = dict(max_memory={"cpu": "200MiB"}, offload_dir=tmp_path / "off", threads=1, progress=False)
    alone, shared = LLM(None, **budget), LLM(None, kv_remote=redis_url, **budget)
    cpu = {owner: n for (owner, tier), n in shared.memory.by_owner().items() if tier == "cpu"}
    assert cpu["kv_remote"] == reserved_bytes(shared.kv.pool.block_bytes)
    assert sum(cpu.values()) <= shared.memory.budgets["cpu"] == 200 << 20
    assert shared.kv.nbytes < alone.kv.nbytes
    prompt = list(range(1000, 1100))
    assert shared.generate([prompt], GREEDY)[0].token_ids == alone.generate([prompt], GREEDY)[0].token_ids
