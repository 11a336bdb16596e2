"""KV tiers within bounds and off the token path: a disk capacity with LRU eviction (also of files left by
earlier runs), a re-put counted once, spills written by a background writer (served from memory meanwhile),
write failures dropped and counted, never raised into a step."""
from __future__ import annotations

from tierlm import LLM, SamplingParams
from tierlm.kvcache.block_file import StoredBlock
from tierlm.kvcache.tier_stack import KVTiers

SALT = b"test-salt"
PAYLOAD = 4096


def _block(i: int) -> StoredBlock:
    return StoredBlock(i.to_bytes(16, "big"), b"\0" * 16, (i, i + 1), bytes([i % 256]) * PAYLOAD)


def _take(t: KVTiers, b: StoredBlock) -> StoredBlock | None:
    return next(t.fetch([(b.hash, b.tokens)], len(b.payload), float("inf")), None)


def test_disk_tier_keeps_its_capacity_lru(tmp_path):
    t = KVTiers("float32", SALT, disk_dir=tmp_path / "kv", disk_capacity=3 * (PAYLOAD + 400))
    for i in range(10):
        t.put(_block(i))  # host tier 0 bytes: straight to the writer
    t.flush()
    files = list((tmp_path / "kv").glob("*.kvb"))
    assert t.disk_used <= t.disk_capacity and len(files) == 3 and t.counters.disk_evictions == 7
    assert t.disk.contains([_block(9).hash, _block(0).hash]) == [True, False]  # the oldest went first
    assert _take(t, _block(8)).payload == _block(8).payload  # a restore refreshes it in the LRU
    t.close()
    # a later run over the same directory: what it finds counts against its (smaller) capacity
    again = KVTiers("float32", SALT, disk_dir=tmp_path / "kv", disk_capacity=2 * (PAYLOAD + 400))
    assert again.disk_used <= again.disk_capacity and len(list((tmp_path / "kv").glob("*.kvb"))) == 2
    again.close()


def test_host_re_put_is_counted_once_and_spills_are_served_while_queued(tmp_path):
    t = KVTiers("float32", SALT, host_bytes=2 * PAYLOAD, disk_dir=tmp_path / "kv")
    t.put(_block(1))
    t.put(_block(1))
    assert t.host_used == PAYLOAD and t.counters.host_puts == 1
    t.put(_block(2))
    t.put(_block(3))  # the host tier holds 2: block 1 spills to the writer
    assert t.host.contains([_block(1).hash]) == [False] and t.disk.contains([_block(1).hash]) == [True]  # queued or written
    assert _take(t, _block(1)).payload == _block(1).payload
    t.close()


def test_a_failing_disk_tier_drops_blocks_and_never_fails_a_step(tmp_path):
    t = KVTiers("float32", SALT, disk_dir=tmp_path / "kv")
    (tmp_path / "kv" / f"{_block(1).hash.hex()}.kvb").mkdir()  # the file's name is taken: its write must fail
    t.put(_block(1))  # returns at once: the writer fails, not the caller
    t.put(_block(2))
    t.flush()
    assert t.counters.write_errors == 1 and t.counters.disk_writes == 1
    assert t.disk.contains([_block(1).hash, _block(2).hash]) == [False, True]
    t.close()


def test_outputs_unchanged_with_a_tiny_disk_tier(tiny_models, tmp_path):
    from tierlm.kvcache.pool import block_nbytes
    path = tiny_models["llama_gqa_tied"].path
    probe = LLM(path, progress=False, block_size=4)
    per = block_nbytes(probe.config, 4, probe.kv.pool.storage)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [[2 + 40 * k + i for i in range(30)] for k in range(5)]
    want = [probe.generate([p], params)[0].token_ids for p in prompts]
    llm = LLM(path, progress=False, block_size=4, kv_memory=12 * per, kv_offload_dir=tmp_path / "kv",
              kv_disk_size=4 * per)
    got = [llm.generate([p], params)[0].token_ids for p in prompts + prompts]
    assert got == want + want
    llm.kv.tiers.flush()
    t = llm.kv.tiers
    assert t.counters.disk_writes > 0 and t.counters.disk_evictions > 0 and t.disk_used <= 4 * per
    assert ("kv_disk", "disk") in llm.memory.by_owner()
    llm.close()


def test_a_spill_dir_of_other_numerics_is_cleared_not_served(tmp_path):
    from tierlm.kvcache.block_file import StoredBlock, write_block
    from tierlm.kvcache.tier_stack import KVTiers
    old = KVTiers("bfloat16", b"numerics1", 0, tmp_path / "kv")
    old.put(StoredBlock(b"\1" * 16, b"\0" * 16, (1, 2), b"x" * 64))
    old.close()
    assert len(list((tmp_path / "kv").glob("*.kvb"))) == 1
    new = KVTiers("bfloat16", b"numerics2", 0, tmp_path / "kv")  # the same directory, another salt
    assert not list((tmp_path / "kv").glob("*.kvb")) and new.disk.contains([b"\1" * 16]) == [False]
    write_block(tmp_path / "kv", StoredBlock(b"\2" * 16, b"\0" * 16, (3,), b"y" * 64), "bfloat16")
    new.close()
    assert len(list((tmp_path / "kv").glob("*.kvb"))) == 1  # ours now: kept
