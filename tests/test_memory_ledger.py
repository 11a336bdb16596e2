"""The memory ledger: reservations with explicit lifetimes, one budget per tier, events; an LLM's owners are
in it while it lives and gone when it closes; `tierlm plan` shows the first reservations."""
from __future__ import annotations

import pytest
from helpers import run_cli

from tierlm import LLM
from tierlm.errors import BudgetError
from tierlm.memory.ledger import MemoryLedger

MiB = 1 << 20


def test_reserve_resize_release_and_the_budget():
    ledger = MemoryLedger({"cpu": 100 * MiB})
    a = ledger.reserve("weights", "cpu", 60 * MiB)
    b = ledger.reserve("kv_pool", "cpu", 30 * MiB)
    assert ledger.used("cpu") == 90 * MiB and ledger.by_owner() == {("weights", "cpu"): 60 * MiB,
                                                                      ("kv_pool", "cpu"): 30 * MiB}
    with pytest.raises(BudgetError, match="kv_host needs"):
        ledger.reserve("kv_host", "cpu", 20 * MiB)
    assert ledger.used("cpu") == 90 * MiB  # a refused reservation holds nothing
    with pytest.raises(BudgetError):
        b.resize(50 * MiB)
    b.resize(40 * MiB)
    b.resize(45 * MiB, check=False)  # recording what an owner already allocated: counted, even past the budget
    assert ledger.used("cpu") == 105 * MiB
    a.release()
    a.release()  # idempotent
    with pytest.raises(ValueError):
        a.resize(1)
    assert ledger.used("cpu") == 45 * MiB
    assert ledger.reserve("x", "disk", 10 ** 12).nbytes == 10 ** 12  # no disk budget: no limit
    kinds = [e.kind for e in ledger.events]
    assert kinds[:2] == ["reserve", "reserve"] and "release" in kinds and "resize" in kinds
    assert "of 100.0 MiB budget" in ledger.describe()


def test_an_llm_reserves_its_owners_and_releases_them(tiny_models, tmp_path):
    llm = LLM(tiny_models["llama_gqa_tied"].path, progress=False, max_memory={"cpu": "2MiB"},
              offload_dir=tmp_path / "off")
    owners = {o for o, _ in llm.memory.by_owner()}
    assert {"weights", "ring", "kv_pool", "workspace", "activations"} <= owners
    assert llm.memory.used("cpu") <= 2 * MiB
    assert llm.memory.by_owner()[("kv_pool", "cpu")] == llm.kv.nbytes
    llm.close()
    assert llm.memory.used("cpu") == 0


def test_plan_prints_the_first_reservations(capsys, tiny_models):
    code, out, _ = run_cli(capsys, "plan", str(tiny_models["llama_gqa_tied"].path), "--max-memory", "cpu=2MiB")
    assert code == 0 and "first reservations of a run" in out and "of 2.0 MiB budget" in out


def test_memory_trace_and_timeline(tiny_models, tmp_path, capsys):
    import json

    from tierlm import SamplingParams
    from tierlm.kvcache.pool import block_nbytes
    path = tiny_models["llama_gqa_tied"].path
    trace = tmp_path / "mem.json"
    probe = LLM(path, progress=False)
    per_block = block_nbytes(probe.config, 4, probe.kv.pool.storage)
    llm = LLM(path, progress=False, block_size=4, kv_memory=12 * per_block, memory_trace=trace)
    for seed in range(4):  # distinct prompts through a 12-block pool: cached blocks get evicted
        llm.generate([[2 + seed * 50 + i for i in range(20)]], SamplingParams(temperature=0.0, max_tokens=8))
    llm.close()
    events = json.loads(trace.read_text())["traceEvents"]
    reserved = [e for e in events if e["name"] == "reserved cpu"]
    assert {"weights", "kv_pool", "workspace"} <= set(reserved[-2]["args"])
    assert all(v == 0 for v in reserved[-1]["args"].values())  # closed: every reservation released
    assert any(e["name"] == "kv_used cpu" and e["args"]["kv_used"] > 0 for e in events)
    assert any(e["ph"] == "i" and e["name"] == "evict" for e in events)
    code, out, _ = run_cli(capsys, "memory-timeline", str(trace), "-o", str(tmp_path / "t.png"))
    assert code == 0 and (tmp_path / "t.png").stat().st_size > 1000
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = run_cli(capsys, "memory-timeline", str(tmp_path / "bad.json"))
    assert code == 2 and "not a tierlm memory trace" in err
