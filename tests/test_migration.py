"""Memory that moves: the pure decisions (cost model, hysteresis band), the pool growing and shrinking, and an
engine whose layers migrate while it serves, with outputs bit-identical to a run that never migrates."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.kvcache.blocks import BlockManager
from tierlm.offload.migration import MARGIN, Demand, decide_demote, decide_promote
from tierlm.offload.planner import PlanInput, plan, spread
from tierlm.offload.tier import Tier

MiB = 1 << 20
BLOCK = 1 * MiB  # a KV block of 1 MiB: a layer of 168 MiB is 168 blocks


def _inp(**kw) -> PlanInput:
    base = dict(num_layers=22, layer_bytes=168 * MiB, head_bytes=250 * MiB, embed_bytes=250 * MiB,
                kv_bytes=64 * MiB, activation_bytes=60 * MiB, fixed_bytes=1 * MiB, cuda=False,
                cpu_budget=None, device_budget=None, disk_gbps=2.0, h2d_gbps=None, compute_gbps=16.0,
                layer_overhead_s=2e-4)
    return PlanInput(**(base | kw))


def _demand(**kw) -> Demand:
    return Demand(**(dict(running=2, waiting=6, short_blocks=20, per_request_blocks=30.0, used_blocks=64,
                          pool_blocks=64) | kw))


def test_demote_uses_free_budget_first_then_the_fewest_layers_worth_it():
    inp = _inp()
    p = plan(inp)
    resident = list(range(22))
    # budget no one holds covers the shortfall: the pool grows, nothing is demoted
    m = decide_demote(inp, p, resident, _demand(), BLOCK, 10_000, 0, budget_free=500 * MiB)
    assert m is not None and not m.demote and m.pool_blocks == 64 + 20 + 5 * 30
    # no free budget, nothing streams yet: the first demotion also pays for a ring of 2 layer-sized slots,
    # so 3 layers free 168 blocks net (covering 20 short)
    m = decide_demote(inp, p, resident, _demand(), BLOCK, 10_000, 0, budget_free=0)
    assert m is not None and len(m.demote) == 3 and m.pool_blocks == 64 + 168
    assert m.token_s > p.token_s  # streaming costs time per step, bought with sequences
    assert sorted(set(resident) - set(m.demote)) == sorted(spread(19, resident))  # what stays is evenly spread
    # a ring already there: one layer is enough
    m = decide_demote(inp, p, resident, _demand(), BLOCK, 10_000, 2 * 168 * MiB, budget_free=0)
    assert m is not None and len(m.demote) == 1 and m.pool_blocks == 64 + 168
    # 30 running and one waiting: one more sequence is not worth a slower step for all 30
    assert decide_demote(inp, p, resident, _demand(running=30, waiting=1), BLOCK, 10_000, 0, budget_free=0) is None
    assert decide_demote(inp, p, resident, _demand(short_blocks=0), BLOCK, 10_000, 0, 0) is None
    assert decide_demote(inp, p, [], _demand(), BLOCK, 10_000, 0, 0) is None  # nothing left to demote
    assert decide_demote(inp, p, resident, _demand(), BLOCK, 70, 0, 0) is None  # the pool's capacity is reached


def test_promote_only_when_nobody_waits_and_the_shrunk_pool_stays_below_the_band():
    inp, resident = _inp(), list(range(21))
    p = plan(inp)
    grown = dict(waiting=0, short_blocks=0, pool_blocks=64 + 168)
    m = decide_promote(inp, p, resident, [21], _demand(**grown, used_blocks=10), BLOCK, 64, budget_free=0)
    assert m is not None and m.promote == (21,) and m.pool_blocks == 64 and m.token_s < p.token_s + 1
    # the shrunk pool of 64 would be over (1 - MARGIN) full: no promotion (hysteresis band)
    used = int((1 - MARGIN) * 64) + 1
    assert decide_promote(inp, p, resident, [21], _demand(**grown, used_blocks=used), BLOCK, 64, 0) is None
    assert decide_promote(inp, p, resident, [21], _demand(pool_blocks=232, used_blocks=0), BLOCK, 64, 0) is None
    # the pool is at its floor: only budget no one holds can take the layer back
    floor = dict(waiting=0, short_blocks=0, pool_blocks=64, used_blocks=0)
    assert decide_promote(inp, p, resident, [21], _demand(**floor), BLOCK, 64, budget_free=100 * MiB) is None
    m = decide_promote(inp, p, resident, [21], _demand(**floor), BLOCK, 64, budget_free=200 * MiB)
    assert m is not None and m.pool_blocks == 64
    assert decide_promote(inp, p, resident, [], _demand(**floor), BLOCK, 64, None) is None


def test_block_manager_grows_and_shrinks_within_floor_and_capacity():
    man = BlockManager(4, 2, capacity=10)
    assert man.resize(11) is None and man.resize(3) is None  # outside [floor, capacity]
    assert man.resize(8) == [] and man.num_free == 8
    a, _ = man.allocate()
    assert a in range(4, 8)  # new blocks are free and reused first
    man.register(a, b"\0" * 16, (1, 2))
    man.release(a)
    blocker, _ = man.allocate()
    if blocker >= 4:
        assert man.resize(4) is None  # a block up there is in use: cannot shrink now
        man.release(blocker)
    else:
        man.release(blocker)
    gone = man.resize(4)
    assert gone is not None and man.num_blocks == 4 and man.num_free == 4
    assert [b for b, _ in gone] == [a] and gone[0][1].tokens == (1, 2)  # its cached prefix, for a lower tier
    assert all(b < 4 for b in man.free)


def _prompts(n: int, length: int) -> list[list[int]]:
    return [[3 + (17 * k + 5 * i) % 400 for i in range(length)] for k in range(n)]


def test_layers_migrate_under_load_and_outputs_stay_bit_identical(tiny_models, tmp_path):
    path = tiny_models["llama_gqa_tied"].path
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = _prompts(6, 30)
    ref = LLM(path, progress=False, block_size=4, enable_prefix_caching=False)
    want = [ref.generate([p], params)[0].token_ids for p in prompts]
    per_block = ref.kv.pool.block_bytes
    kw = dict(progress=False, block_size=4, kv_memory=12 * per_block, offload_dir=tmp_path / "off",
              enable_prefix_caching=False, max_context=64)
    exact = LLM(path, max_memory={"cpu": "64MiB"}, **kw).plan.device_bytes  # all resident, no headroom
    llm = LLM(path, max_memory={"cpu": exact}, migrate=True, **kw)
    assert llm.plan.count(Tier.DEVICE) == 3
    m = llm.engine.migrator
    m.hold_steps, m.dwell_s = 1, 0.0
    # This model's 150 KiB layers stream at the calibrated disk's small-request rate: the cost model would
    # (rightly) keep them resident. On a disk as fast as memory, a demotion pays: the decision flips.
    m.inp = replace(m.inp, disk_curve=(), disk_gbps=100.0)
    out = [o.token_ids for o in llm.generate(prompts, params)]
    assert out == want  # batched, with layers moving between memory and the stream mid-run
    assert m.demotions >= 1 and llm.engine.scheduler.counters.max_running > 1
    assert llm.store.streamer is not None and llm.kv.manager.num_blocks > 12
    held = llm.memory.by_owner()
    assert held[("weights", "cpu")] == sum(llm.store.nbytes_by_tier().values())
    assert held[("kv_pool", "cpu")] == llm.kv.nbytes and held[("ring", "cpu")] == llm.store.ring_nbytes
    assert llm.memory.used("cpu") <= exact
    for _ in range(8):  # idle: the pool shrinks back and the layers come home
        m.tick(llm.engine.scheduler)
    assert m.promotions == m.demotions and llm.store.resident_layers() == [0, 1, 2]
    # the pool keeps what the budget holds free (the ledger's slack taken first), and no more
    assert llm.kv.manager.num_blocks >= 12 and llm.store.streamer is None and llm.memory.used("cpu") <= exact
    assert llm.memory.by_owner()[("ring", "cpu")] == 0
    assert [o.token_ids for o in llm.generate(prompts[:2], params)] == want[:2]


def test_migrated_layers_give_identical_logits(tiny_models, tmp_path):
    path = tiny_models["qwen2"].path
    llm = LLM(path, progress=False, max_memory={"cpu": "64MiB"}, offload_dir=tmp_path / "off", migrate=True,
              max_context=64)
    tokens = [5, 9, 33, 2, 71, 8]
    logits = []
    for move in (None, ("demote", [1]), ("demote", [0]), ("promote", [0, 1])):
        if move:
            getattr(llm.store, move[0])(move[1])
        logits.append(llm.prompt_logits(tokens))  # [T, V], through the engine
    assert all(torch.equal(logits[0], x) for x in logits[1:])


def test_migrate_needs_a_budget_and_an_offload_dir(tiny_models):
    from tierlm.errors import UsageError
    with pytest.raises(UsageError, match="migrate needs max_memory and offload_dir"):
        LLM(tiny_models["qwen2"].path, progress=False, migrate=True)


def _migrating(tiny_models, tmp_path) -> LLM:
    path = tiny_models["llama_gqa_tied"].path
    probe = LLM(path, progress=False, block_size=4)
    kw = dict(progress=False, block_size=4, kv_memory=12 * probe.kv.pool.block_bytes, offload_dir=tmp_path / "off",
              max_context=64)
    exact = LLM(path, max_memory={"cpu": "64MiB"}, **kw).plan.device_bytes
    llm = LLM(path, max_memory={"cpu": exact}, migrate=True, **kw)
    llm.engine.migrator.inp = replace(llm.engine.migrator.inp, disk_curve=(), disk_gbps=100.0)
    return llm


def test_hysteresis_a_flapping_demand_moves_nothing(tiny_models, tmp_path):
    llm = _migrating(tiny_models, tmp_path)
    m = llm.engine.migrator
    m.dwell_s = 0.0
    short = Demand(running=1, waiting=3, short_blocks=30, per_request_blocks=9.0, used_blocks=12, pool_blocks=12)
    calm = Demand(running=1, waiting=0, short_blocks=0, per_request_blocks=0.0, used_blocks=0, pool_blocks=12)
    seq = iter([short, calm] * 10 + [short] * 4)
    m.demand = lambda sched: next(seq)  # the queue's view, scripted
    moves = [m.tick(llm.engine.scheduler) for _ in range(24)]
    assert moves[:20] == [None] * 20  # wanted for one step at a time: never HOLD_STEPS in a row
    assert moves[20:23] == [None] * 3 and moves[23] is not None and moves[23].demote  # 4 steps in a row: demote
    m.dwell_s = 3600.0
    m.demand = lambda sched: replace(calm, pool_blocks=llm.kv.manager.num_blocks)  # idle, at the real pool size
    assert all(m.tick(llm.engine.scheduler) is None for _ in range(10))  # within the dwell time: nothing
    m.dwell_s = 0.0
    moved = [m.tick(llm.engine.scheduler) for _ in range(10)]
    assert any(moved) and m.promotions == m.demotions and llm.store.resident_layers() == [0, 1, 2]


def test_high_pressure_sheds_a_layer_and_freezes_promotions(tiny_models, tmp_path):
    from tierlm.engine.pressure_control import PressureControl
    from tierlm.memory.pressure import Level
    llm = _migrating(tiny_models, tmp_path)
    m = llm.engine.migrator
    fraction = [0.5]
    control = PressureControl(llm.engine, llm.memory, read=lambda: (int(fraction[0] * 1000), 1000, "test"))
    weights = llm.memory.by_owner()[("weights", "cpu")]
    fraction[0] = 0.92
    assert control.check() == Level.HIGH
    # nothing streamed yet: the ring of 2 slots comes first, so 3 layers go for one layer's bytes net
    assert m.frozen and m.demotions == 3 and llm.store.resident_layers() == []
    held = llm.memory.by_owner()
    assert held[("weights", "cpu")] + held[("ring", "cpu")] < weights  # bytes given back, not re-lent to KV
    assert llm.kv.manager.num_blocks == llm.kv.manager.floor
    m.hold_steps, m.dwell_s = 1, 0.0
    assert all(m.tick(llm.engine.scheduler) is None for _ in range(3))  # frozen: no promotion
    fraction[0] = 0.3
    assert control.check() == Level.NORMAL and not m.frozen
    moved = [m.tick(llm.engine.scheduler) for _ in range(3)]
    assert any(moved) and llm.store.resident_layers() == [0, 1, 2]


def test_a_shrunk_pool_hands_its_pages_back():
    import os
    from tierlm.kvcache.pool import KVPool

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    from tierlm.config import ModelConfig
    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
                      num_kv_heads=4, head_dim=64, max_position_embeddings=64)
    pool = KVPool(cfg, 64, 16, torch.float32, capacity=1024)  # 128 KiB a block: 128 MiB addressable
    base = rss()
    for b in range(1024):
        pool.zero(b)  # every block used once: its pages committed
    full = rss()
    assert full - base > 100 << 20
    assert pool.discard(64, 1024) > 100 << 20
    assert rss() < full - (100 << 20)
    assert pool.nbytes == 64 * pool.block_bytes
