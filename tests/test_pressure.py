"""Memory pressure: levels with hysteresis, and the engine's graded responses driven level by level on a
tiny model (the OS reading is replaced by a scripted one); nothing accepted is lost or changed."""
from __future__ import annotations

import asyncio

import pytest

from tierlm import LLM, SamplingParams
from tierlm.engine.pressure_control import PressureControl
from tierlm.kvcache.pool import block_nbytes
from tierlm.memory.pressure import Level, level_of, read_memory
from tierlm.serve.loop import EngineLoop
from tierlm.serve.protocol import OpenAIError


def test_levels_and_hysteresis():
    assert [level_of(f) for f in (0.5, 0.8, 0.9, 0.95, 1.2)] == [0, 1, 2, 3, 3]
    assert level_of(0.93, Level.CRITICAL) == Level.CRITICAL  # within the 5% margin: stays
    assert level_of(0.89, Level.CRITICAL) == Level.HIGH
    assert level_of(0.77, Level.ELEVATED) == Level.ELEVATED and level_of(0.74, Level.ELEVATED) == Level.NORMAL
    assert level_of(0.5, Level.CRITICAL) == Level.NORMAL
    used, limit, source = read_memory()  # the real reading: this process's cgroup, or the machine
    assert 0 < used < limit and source in ("cgroup", "machine")


class Scripted:
    """The OS reading, scripted: fraction of a 1 GiB limit."""

    def __init__(self):
        self.fraction = 0.5

    def __call__(self):
        return int(self.fraction * (1 << 30)), 1 << 30, "test"


def test_graded_responses_lose_nothing(tiny_models):
    path = tiny_models["llama_gqa_tied"].path
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [[2 + 30 * k + i for i in range(18)] for k in range(4)]
    ref = LLM(path, progress=False)
    want = [ref.generate([p], params)[0].token_ids for p in prompts]
    per = block_nbytes(ref.config, 16, ref.kv.pool.storage)
    llm = LLM(path, progress=False, kv_host_memory=8 * per)
    reading = Scripted()
    control = PressureControl(llm.engine, llm.memory, reading)
    tiers, sched = llm.kv.tiers, llm.engine.scheduler

    reading.fraction = 0.85
    assert control.check() == Level.ELEVATED and tiers.host_bytes == 4 * per
    reading.fraction = 0.91
    assert control.check() == Level.HIGH and tiers.host_bytes == 0 and not sched.paused
    reading.fraction = 0.5
    assert control.check() == Level.NORMAL and tiers.host_bytes == 8 * per

    # critical while requests run: the newest is preempted, admissions pause, the server refuses new work
    loop = EngineLoop(llm.engine, 100, control)
    outs = []

    async def run():
        q = asyncio.Queue()
        reqs = [loop.submit(p, params, q, i) for i, p in enumerate(prompts)]
        for _ in range(4):
            llm.engine.step()
        reading.fraction = 0.97
        loop._take_snapshot()
        assert control.level == Level.CRITICAL and sched.paused and llm.engine.scheduler.counters.preemptions == 1
        with pytest.raises(OpenAIError) as e:
            loop.submit(prompts[0], params, q)
        assert e.value.status == 503 and e.value.headers["Retry-After"]
        for _ in range(3):
            llm.engine.step()
        running = len(sched.running)
        assert sched.waiting and running == 3  # the preempted one waits; nothing new was admitted
        reading.fraction = 0.6
        loop._take_snapshot()
        assert control.level == Level.NORMAL and not sched.paused
        llm.engine.run()
        outs.extend(r.out.token_ids for r in reqs)

    asyncio.run(run())
    assert outs == want
    assert control.transitions == 5 and llm.kv.manager.num_free == llm.kv.manager.num_blocks
    assert [e.owner for e in llm.memory.events if e.kind == "pressure"] == []  # tracing off: not kept
