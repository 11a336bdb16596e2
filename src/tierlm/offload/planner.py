"""The planner: where every unit lives, how deep the ring is, and what a token will cost. Pure functions.

Decode touches every layer once per token, in order: a cyclic access pattern on which LRU caching gets
zero hits. So the planner keeps a fixed resident set and streams the rest through a ring of `ring_depth`
slots (each as big as the largest streamed unit). Every resident byte saves the same I/O per token, so
the resident set is as large as the budget allows; what remains to choose is where the head and the
embedding go and the ring depth, and those few options are compared by simulating the pipeline.

Memory accounting (everything the budget must hold; the runtime's fixed overhead is outside it):
  CPU only   cpu    = resident units + ring_depth × slot + KV + activations + fixed
  CUDA       device = DEVICE units + ring_depth × slot + KV + activations + fixed
             cpu    = HOST units (pinned) + ring_depth × largest DISK unit (pinned staging)
"""
from __future__ import annotations

from dataclasses import dataclass

from tierlm.config import format_size
from tierlm.errors import BudgetError
from tierlm.offload.disk_model import DiskModel, in_flight, io_threads_for
from tierlm.offload.tier import Tier

EMBED_ROW_S = 1e-4  # one on-demand embedding row read per prompt token: latency-bound, ~0.1 ms
RING_DEPTHS = (2, 3, 4, 6, 8)  # deeper rings only win where small units leave the disk short of bytes in flight
REQUEST_BYTES = 8 << 20  # the streamer's read request (disk_layout.CHUNK_BYTES)


@dataclass(frozen=True)
class PlanInput:
    num_layers: int
    layer_bytes: int  # one decoder layer (every layer of a Llama-family model is the same size)
    head_bytes: int
    embed_bytes: int  # 0 when tied: the head unit then serves embedding rows too
    kv_bytes: int
    activation_bytes: int
    fixed_bytes: int  # final norm, rope tables, row buffers: small and always resident
    cuda: bool
    cpu_budget: int | None  # None = no limit
    device_budget: int | None  # CUDA only; None = no limit
    disk_gbps: float
    h2d_gbps: float | None
    compute_gbps: float  # weight bytes per second through decode matmuls
    layer_overhead_s: float  # per-layer cost beyond the matmul bytes (dispatch, attention, norms)
    ring_depth: int | None = None  # None = the planner chooses (RING_DEPTHS)
    disk_curve: tuple[tuple[int, float], ...] = ()  # measured (bytes in flight, GB/s); () = disk_gbps at any depth

    @property
    def disk(self) -> DiskModel:
        return DiskModel.of(self.disk_curve) if self.disk_curve else DiskModel.flat(self.disk_gbps)


@dataclass(frozen=True)
class Placement:
    layer_tiers: tuple[Tier, ...]
    head_tier: Tier
    embed_tier: Tier
    ring_depth: int  # 0 when nothing streams
    slot_bytes: int  # one ring slot
    io_threads: int  # concurrent reads that saturate the disk with this slot size (disk_model.io_threads_for)
    disk_gbps: float  # the bandwidth the disk model gives at this plan's bytes in flight
    device_bytes: int  # planned use of the compute memory (RAM on a CPU-only machine)
    host_bytes: int  # planned pinned host memory (CUDA only)
    disk_bytes_per_token: int
    h2d_bytes_per_token: int
    io_s: float  # per token, the busiest transfer stage alone
    compute_s: float  # per token, compute alone
    token_s: float  # per token, predicted by simulating the pipeline

    @property
    def tok_s(self) -> float:
        return 1.0 / self.token_s if self.token_s > 0 else float("inf")

    def count(self, tier: Tier) -> int:
        return sum(t == tier for t in self.layer_tiers)


def spread(count: int, among: list[int]) -> set[int]:
    """`count` evenly spaced members of `among`: interleaving resident and streamed layers lets the disk
    work ahead while resident layers compute (a contiguous resident block would leave it idle)."""
    n = len(among)
    return {among[int((j + 0.5) * n / count)] for j in range(count)} if count else set()


def _memory(inp: PlanInput, layers: tuple[Tier, ...], head: Tier, embed: Tier, k: int) -> tuple[int, int, int]:
    """(device_or_cpu bytes, pinned host bytes, slot bytes) for this placement."""
    sizes = [(t, inp.layer_bytes) for t in layers] + [(head, inp.head_bytes)]
    resident_dev = sum(b for t, b in sizes if t == Tier.DEVICE)
    if inp.embed_bytes and embed == Tier.DEVICE:
        resident_dev += inp.embed_bytes
    streamed = [b for t, b in sizes if t != Tier.DEVICE]
    slot = max(streamed, default=0)
    dev = resident_dev + k * slot + inp.kv_bytes + inp.activation_bytes + inp.fixed_bytes
    if not inp.cuda:
        return dev, 0, slot
    host = sum(b for t, b in sizes if t == Tier.HOST) + (inp.embed_bytes if embed == Tier.HOST else 0)
    host += k * max((b for t, b in sizes if t == Tier.DISK), default=0)
    return dev, host, slot


def _fits(inp: PlanInput, dev: int, host: int) -> bool:
    if inp.cuda:
        return (inp.device_budget is None or dev <= inp.device_budget) and (inp.cpu_budget is None or host <= inp.cpu_budget)
    return inp.cpu_budget is None or dev <= inp.cpu_budget


def simulate(units: list[tuple[Tier, int, float]], k: int, disk_gbps: float, h2d_gbps: float | None,
             cycles: int = 3) -> float:
    """Seconds per token in steady state. units: (tier, bytes, compute seconds) in access order.
    Load n of the cyclic stream may start once the slot of load n-k is released (its compute ended);
    with CUDA a second stage copies host -> device and the disk stage needs a free pinned staging slot."""
    streamed = [u for u in units if u[0] != Tier.DEVICE]
    if not streamed:
        return sum(u[2] for u in units)
    cuda = h2d_gbps is not None
    disk_free = h2d_free = 0.0
    released: dict[int, float] = {}  # load n -> when its ring slot was released
    staged: dict[int, float] = {}  # load n -> when its pinned staging slot was freed (CUDA)
    ready: dict[int, float] = {}

    def schedule(n: int) -> None:
        nonlocal disk_free, h2d_free
        tier, nbytes, _ = streamed[n % len(streamed)]
        t = 0.0
        if tier == Tier.DISK:
            slot_free = staged.get(n - k, 0.0) if cuda else released.get(n - k, 0.0)
            disk_free = max(disk_free, slot_free) + nbytes / (disk_gbps * 1e9)
            t = disk_free
        if cuda:
            h2d_free = max(h2d_free, t, released.get(n - k, 0.0)) + nbytes / (h2d_gbps * 1e9)
            t = staged[n] = h2d_free
        ready[n] = t

    for n in range(k):
        schedule(n)
    t, n, start = 0.0, 0, 0.0
    for _ in range(cycles):
        start = t
        for tier, _, compute in units:
            if tier != Tier.DEVICE:
                t = max(t, ready[n])
            t += compute
            if tier != Tier.DEVICE:
                released[n] = t
                schedule(n + k)
                n += 1
    return t - start


def _layer_tiers(inp: PlanInput, n_dev: int, n_host: int) -> tuple[Tier, ...]:
    all_layers = list(range(inp.num_layers))
    dev = spread(n_dev, all_layers)
    host = spread(n_host, [i for i in all_layers if i not in dev])
    return tuple(Tier.DEVICE if i in dev else Tier.HOST if i in host else Tier.DISK for i in all_layers)


def _candidate(inp: PlanInput, head: Tier, embed: Tier, k: int) -> Placement | None:
    """The largest resident set (DEVICE first, then HOST) for these choices, or None if nothing fits."""
    big = inp.num_layers
    for n_dev in range(big, -1, -1):
        for n_host in (range(big - n_dev, -1, -1) if inp.cuda else [0]):
            layers = _layer_tiers(inp, n_dev, n_host)
            dev, host, slot = _memory(inp, layers, head, embed, k)
            if _fits(inp, dev, host):
                return _placement(inp, layers, head, embed, k, dev, host, slot)
    return None


def _placement(inp: PlanInput, layers: tuple[Tier, ...], head: Tier, embed: Tier, k: int,
               dev: int, host: int, slot: int) -> Placement:
    disk = inp.disk
    threads = io_threads_for(disk, slot, REQUEST_BYTES) if slot else 0
    gbps = disk.gbps(in_flight(k, slot, threads, REQUEST_BYTES)) if slot else disk.best_gbps
    per_layer_compute = inp.layer_bytes / (inp.compute_gbps * 1e9) + inp.layer_overhead_s
    units = [(t, inp.layer_bytes, per_layer_compute) for t in layers]
    units.append((head, inp.head_bytes, inp.head_bytes / (inp.compute_gbps * 1e9)))
    streams = any(u[0] != Tier.DEVICE for u in units)
    disk_bytes = sum(b for t, b, _ in units if t == Tier.DISK)
    h2d = sum(b for t, b, _ in units if t != Tier.DEVICE) if inp.cuda else 0
    embed_s = EMBED_ROW_S if embed != Tier.DEVICE else 0.0
    io_s = max(disk_bytes / (gbps * 1e9), h2d / (inp.h2d_gbps * 1e9) if inp.cuda and inp.h2d_gbps else 0.0)
    token_s = simulate(units, k, gbps, inp.h2d_gbps if inp.cuda else None) + embed_s
    return Placement(layer_tiers=layers, head_tier=head, embed_tier=embed, ring_depth=k if streams else 0,
                     slot_bytes=slot, io_threads=threads if streams else 0, disk_gbps=gbps, device_bytes=dev, host_bytes=host,
                     disk_bytes_per_token=disk_bytes, h2d_bytes_per_token=h2d, io_s=io_s, compute_s=sum(u[2] for u in units), token_s=token_s)


def predict(inp: PlanInput, p: Placement) -> Placement:
    """The same placement re-costed under `inp` (say, with a disk bandwidth measured just now)."""
    dev, host, slot = _memory(inp, p.layer_tiers, p.head_tier, p.embed_tier, p.ring_depth)
    return _placement(inp, p.layer_tiers, p.head_tier, p.embed_tier, p.ring_depth, dev, host, slot)


def minimum_bytes(inp: PlanInput, k: int = 2) -> tuple[int, int]:
    """Smallest (device_or_cpu, host) footprint: everything streamed from disk through a k-deep ring."""
    dev, host, _ = _memory(inp, (Tier.DISK,) * inp.num_layers, Tier.DISK, Tier.DISK, k)
    return dev, host


def plan(inp: PlanInput) -> Placement:
    """The fastest placement that fits the budgets; BudgetError (with the minimum) when none fits."""
    if inp.cuda and inp.h2d_gbps is None:
        raise ValueError("a CUDA plan needs the host->device bandwidth")
    tiers = [Tier.DEVICE, Tier.HOST, Tier.DISK] if inp.cuda else [Tier.DEVICE, Tier.DISK]
    depths = [inp.ring_depth] if inp.ring_depth else list(RING_DEPTHS)
    found = []
    for head in tiers:
        # Tied: embedding rows come from the head's matrix wherever it lives; no separate placement.
        for embed in tiers if inp.embed_bytes else [head]:
            for k in depths:
                if (p := _candidate(inp, head, embed, k)) is not None:
                    found.append(p)
    if not found:
        dev, host = minimum_bytes(inp, depths[0])
        if inp.cuda and inp.device_budget is not None and dev > inp.device_budget:
            raise BudgetError(f"the device budget {format_size(inp.device_budget)} is below this model's minimum "
                              f"of {format_size(dev)} ({depths[0]} ring slots, KV cache, activations)")
        need, have, what = ((host, inp.cpu_budget, "pinned host staging") if inp.cuda else
                            (dev, inp.cpu_budget, f"{depths[0]} ring slots, KV cache, activations"))
        raise BudgetError(f"the cpu budget {format_size(have or 0)} is below this model's minimum of "
                          f"{format_size(need)} ({what}); raise --max-memory or lower --max-context")
    return min(found, key=lambda p: (round(p.token_s, 6), p.device_bytes + p.host_bytes))
