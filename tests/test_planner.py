"""The planner is a pure function: placements fit their budgets, use them fully, and predict sensibly."""
from __future__ import annotations

import pytest

from tierlm.errors import BudgetError, UsageError
from tierlm.memory.budget import MemoryBudget
from tierlm.offload.planner import PlanInput, minimum_bytes, plan, simulate, spread
from tierlm.offload.tier import Tier

MiB = 1 << 20


def _inp(**kw) -> PlanInput:
    """A 1.1B-like model: 22 layers of 168 MiB, head and embedding 250 MiB (fp32)."""
    base = dict(num_layers=22, layer_bytes=168 * MiB, head_bytes=250 * MiB, embed_bytes=250 * MiB,
                kv_bytes=11 * MiB, activation_bytes=60 * MiB, fixed_bytes=1 * MiB, cuda=False,
                cpu_budget=1024 * MiB, device_budget=None, disk_gbps=2.0, h2d_gbps=None, compute_gbps=16.0,
                layer_overhead_s=2e-4)
    return PlanInput(**(base | kw))


def test_budget_parse_forms():
    assert MemoryBudget.parse("cpu=1GiB") == MemoryBudget(cpu=1 << 30)
    assert MemoryBudget.parse({"cuda:1": "4GiB", "cpu": "16GiB"}) == MemoryBudget(16 << 30, 4 << 30, "cuda:1")
    assert MemoryBudget.parse({0: "2GiB"}) == MemoryBudget(None, 2 << 30, "cuda:0")  # Accelerate's int keys
    assert MemoryBudget.parse(" cuda = 1GiB , cpu=512MiB ") == MemoryBudget(512 << 20, 1 << 30, "cuda:0")
    assert not MemoryBudget.parse(None).limited and str(MemoryBudget()) == "unlimited"
    assert str(MemoryBudget.parse("cpu=1GiB,cuda:0=4GiB")) == "cuda:0=4.0 GiB,cpu=1.0 GiB"


@pytest.mark.parametrize("spec, match", [("cpu", "KEY=SIZE"), ("gpu=1GiB", "unknown memory"),
                                         ("cpu=lots", "cannot parse size"), ("cuda:0=1GiB,cuda:1=1GiB", "one CUDA device")])
def test_budget_parse_errors(spec, match):
    with pytest.raises(UsageError, match=match):
        MemoryBudget.parse(spec)


def test_unlimited_budget_keeps_everything_resident():
    p = plan(_inp(cpu_budget=None))
    assert set(p.layer_tiers) == {Tier.DEVICE} and p.head_tier == p.embed_tier == Tier.DEVICE
    assert p.ring_depth == 0 and p.disk_bytes_per_token == 0
    assert p.token_s == pytest.approx(p.compute_s)


@pytest.mark.parametrize("budget_mib", [700, 1024, 2048, 3000])
def test_plan_fits_the_budget_and_uses_it(budget_mib):
    inp = _inp(cpu_budget=budget_mib * MiB)
    p = plan(inp)
    assert p.device_bytes <= inp.cpu_budget
    # maximal: one more resident layer would not fit (with the same ring)
    assert p.device_bytes + inp.layer_bytes > inp.cpu_budget or p.count(Tier.DISK) == 0
    n_res = p.count(Tier.DEVICE)
    assert p.disk_bytes_per_token == (22 - n_res) * inp.layer_bytes + (inp.head_bytes if p.head_tier == Tier.DISK else 0)
    assert p.token_s >= max(p.io_s, p.compute_s) - 1e-9  # no plan beats its own bottleneck


def test_more_budget_is_never_slower():
    times = [plan(_inp(cpu_budget=b * MiB)).token_s for b in (700, 1024, 1500, 2048, 3000, 4096)]
    assert all(a >= b - 1e-9 for a, b in zip(times, times[1:]))


def test_resident_layers_are_spread_not_bunched():
    assert spread(2, list(range(22))) == {5, 16}
    assert spread(0, [1, 2]) == set() and spread(3, [0, 1, 2]) == {0, 1, 2}


def test_below_minimum_is_refused_with_the_minimum():
    inp = _inp(cpu_budget=300 * MiB)
    need, _ = minimum_bytes(inp)
    assert need == 2 * 250 * MiB + 11 * MiB + 60 * MiB + 1 * MiB  # 2 slots of the largest unit + KV + act + fixed
    with pytest.raises(BudgetError, match=r"below this model's minimum of 572\.0 MiB"):
        plan(inp)


def test_simulate_is_bounded_by_io_and_compute():
    units = [(Tier.DISK, 10**9, 0.1)] * 4  # 1 GB per unit at 1 GB/s: I/O bound, 4 s per token
    assert simulate(units, 2, disk_gbps=1.0, h2d_gbps=None) == pytest.approx(4.0, rel=0.01)
    units = [(Tier.DISK, 10**8, 0.5)] * 4  # 0.1 s of I/O per unit: compute bound, 2 s per token
    assert simulate(units, 2, disk_gbps=1.0, h2d_gbps=None) == pytest.approx(2.0, rel=0.01)
    # a ring of one cannot overlap: each load waits for the previous compute
    assert simulate(units, 1, disk_gbps=1.0, h2d_gbps=None) == pytest.approx(4 * 0.6, rel=0.01)


def test_cuda_plan_uses_host_tier_and_respects_both_budgets():
    inp = _inp(cuda=True, device_budget=1200 * MiB, cpu_budget=2048 * MiB, h2d_gbps=20.0, compute_gbps=1000.0)
    p = plan(inp)
    assert p.device_bytes <= inp.device_budget and p.host_bytes <= inp.cpu_budget
    assert p.count(Tier.HOST) > 0  # pinned RAM is a faster tier than disk
    assert p.h2d_bytes_per_token > p.disk_bytes_per_token
