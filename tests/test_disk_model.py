"""The disk model: bandwidth over bytes in flight, and the ring depth / I/O threads the planner derives from it."""
from __future__ import annotations

import pytest

from tierlm.offload.calibrate import measure_disk
from tierlm.offload.disk_model import DiskModel, in_flight, io_threads_for
from tierlm.offload.planner import PlanInput, plan
from tierlm.offload.tier import Tier

MiB = 1 << 20
# a virtual disk that needs ~32 MiB in flight: 0.4 GB/s with one 1 MiB read, 2.0 GB/s from 32 MiB
RISING = ((1 * MiB, 0.4), (4 * MiB, 1.0), (8 * MiB, 1.4), (16 * MiB, 1.8), (32 * MiB, 2.0), (64 * MiB, 2.02))


def test_curve_interpolates_and_saturates():
    m = DiskModel.of(RISING)
    assert m.gbps(1 * MiB) == pytest.approx(0.4) and m.gbps(MiB // 2) == pytest.approx(0.2)  # below: proportional
    assert m.gbps(6 * MiB) == pytest.approx(1.2)  # halfway between 4 and 8 MiB
    assert m.gbps(1 << 40) == pytest.approx(2.02)  # flat beyond the last point
    assert m.best_gbps == pytest.approx(2.02) and m.saturating_bytes() == 32 * MiB  # 2.0 >= 0.95 * 2.02
    assert DiskModel.flat(1.5).gbps(1) == DiskModel.flat(1.5).gbps(1 << 30) == 1.5
    noisy = DiskModel.of([(4 * MiB, 1.4), (1 * MiB, 1.36), (32 * MiB, 1.16)])  # a dip at depth is noise
    assert noisy.gbps(32 * MiB) == pytest.approx(1.4) and noisy.saturating_bytes() == 1 * MiB
    with pytest.raises(ValueError):
        DiskModel.of([(0, 1.0)])


def test_in_flight_is_capped_by_threads_and_by_the_loads_ahead():
    assert in_flight(2, 120 * MiB, 4, 8 * MiB) == 32 * MiB  # big units: the threads are the limit
    assert in_flight(2, 2 * MiB, 16, 8 * MiB) == 2 * MiB  # small units, shallow ring: one unit ahead
    assert in_flight(8, 2 * MiB, 16, 8 * MiB) == 14 * MiB  # a deeper ring keeps 7 units ahead
    m = DiskModel.of(RISING)
    assert io_threads_for(m, 120 * MiB, 8 * MiB) == 4  # 32 MiB in 8 MiB requests
    assert io_threads_for(m, 2 * MiB, 8 * MiB) == 16  # 32 MiB in 2 MiB units
    assert io_threads_for(DiskModel.flat(2.0), 2 * MiB, 8 * MiB) == 4  # never fewer than MIN_IO_THREADS


def _small(curve=()) -> PlanInput:
    """The embedded model's shape: 30 layers of 2 MiB, a budget that holds only a third of them."""
    return PlanInput(num_layers=30, layer_bytes=2 * MiB, head_bytes=2 * MiB, embed_bytes=0, kv_bytes=4 * MiB,
                     activation_bytes=4 * MiB, fixed_bytes=MiB, cuda=False, cpu_budget=40 * MiB, device_budget=None,
                     disk_gbps=2.02, h2d_gbps=None, compute_gbps=20.0, layer_overhead_s=5e-5, disk_curve=curve)


def test_small_units_get_a_deeper_ring_when_the_disk_needs_bytes_in_flight():
    flat, rising = plan(_small()), plan(_small(RISING))
    assert flat.ring_depth == 2  # nothing to gain from depth: the smallest ring, the most resident layers
    assert rising.ring_depth > 2 and rising.io_threads >= rising.ring_depth - 1
    assert rising.disk_gbps > DiskModel.of(RISING).gbps(2 * MiB)  # more in flight than one unit ahead gives
    # the deeper ring costs resident layers, and still wins: the plan is the fastest the model predicts
    shallow = plan(PlanInput(**{**_small(RISING).__dict__, "ring_depth": 2}))
    assert rising.count(Tier.DEVICE) < shallow.count(Tier.DEVICE) and rising.token_s < shallow.token_s


def test_big_units_keep_a_shallow_ring_and_size_the_threads():
    inp = PlanInput(**{**_small(RISING).__dict__, "layer_bytes": 120 * MiB, "head_bytes": 120 * MiB,
                       "cpu_budget": 1536 * MiB})
    p = plan(inp)
    assert p.ring_depth == 2 and p.io_threads == 4 and p.disk_gbps == pytest.approx(2.0)


def test_calibrate_measures_a_curve(tmp_path):
    curve, _ = measure_disk(tmp_path, 16 * MiB, reps=1, progress=False)
    assert [b for b, _ in curve] == sorted(b for b, _ in curve) and curve[0][0] == 1 * MiB
    assert all(g > 0 for _, g in curve)
    assert not list(tmp_path.glob(".tierlm-calibrate*"))
