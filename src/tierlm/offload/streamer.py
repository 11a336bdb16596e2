"""The streamer: a ring of `depth` preallocated slots through which off-device units flow, in a fixed cyclic
order (decode walks the layers the same way every token, so the next unit is always known).

    acquire(u)  wait for u's chunks (read + checksum on the I/O threads) -> tensors viewing its slot
    release(u)  the slot is free again -> the load `depth` places ahead is submitted at once

The runner drives everything from its own thread; a pool of `io_threads` reads CHUNK_BYTES pieces with
O_DIRECT (buffered + DONTNEED where refused) and verifies each chunk as it lands. A failed or corrupt
chunk is re-read once; failing again, the unit is rebuilt in place from the source (OffloadStore.repair) and
read a last time, or a clear ChecksumError says why it cannot be. Nothing waits forever on a read that
already failed, and nothing is raised while reads of the same load are still writing into its slot.
With CUDA the slots are pinned host buffers and each unit is then copied on a side stream into a device
slot; compute waits on an event, and a host slot is reused only after its copy finished.
Invariant: at most `depth` loads are in flight or held, each in its own slot (slot = load number % depth).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from tierlm.errors import ModelFormatError
from tierlm.memory.directio import AlignedBuffer
from tierlm.offload.disk_store import OffloadStore
from tierlm.offload.stats import BusyClock, TierStats


class Streamer:
    def __init__(self, offload: OffloadStore, schedule: list[str], depth: int, stats: TierStats,
                 device: torch.device, host_resident: dict[str, torch.Tensor] | None = None,
                 io_threads: int = 4, direct: bool = True):
        if depth < 1 or not schedule:
            raise ValueError("a streamer needs depth >= 1 and a non-empty schedule")
        self.offload, self.schedule, self.depth, self.stats = offload, schedule, depth, stats
        self.device = device
        self.cuda = device.type == "cuda"
        self._host_resident = host_resident or {}  # CUDA HOST tier: pinned copies, no disk read
        self._buffers: list[AlignedBuffer] = []
        self._make_slots(schedule)
        self._reader = offload.open_reader(direct)
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="tierlm-io")
        self._clock = BusyClock()
        self._pending: dict[int, list[tuple[tuple[int, int], Future]]] = {}
        self._views: dict[tuple[int, str], dict] = {}  # (slot, unit) -> its tensors viewing that slot
        self._next = 0  # load number the runner acquires next; load n streams schedule[n % len]
        self._position = {u: k for k, u in enumerate(schedule)}
        self._start(0)

    def _make_slots(self, schedule: list[str]) -> None:
        depth, offload, device = self.depth, self.offload, self.device
        slot_bytes = offload.max_unit_bytes([u for u in schedule if u not in self._host_resident]) \
            if any(u not in self._host_resident for u in schedule) else 0
        self.slot_bytes = slot_bytes
        self.ring_bytes = depth * slot_bytes  # host memory of the slots (pinned staging on CUDA)
        if self.cuda:
            self._host_slots = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(depth)]
            dev_bytes = offload.max_unit_bytes(schedule)
            self._dev_slots = [torch.empty(dev_bytes, dtype=torch.uint8, device=device) for _ in range(depth)]
            self._copy_stream = torch.cuda.Stream(device)
            self._copied = [torch.cuda.Event() for _ in range(depth)]  # H2D into slot s finished
            self._computed = [torch.cuda.Event() for _ in range(depth)]  # compute reading dev slot s finished
        else:
            self._buffers = [AlignedBuffer(slot_bytes) for _ in range(depth)]
            self._host_slots = [b.tensor() for b in self._buffers]

    def reschedule(self, schedule: list[str]) -> None:
        """Stream another set of units (layers migrated, offload/migration.py), between passes: nothing acquired
        is held. Reads in flight finish first; the slots are reallocated only when a unit outgrows them."""
        if not schedule:
            raise ValueError("an empty schedule: close the streamer instead")
        self._drain()
        self._views.clear()  # the slot each unit lands in follows from its position
        need = self.offload.max_unit_bytes([u for u in schedule if u not in self._host_resident])
        if need > self.slot_bytes:
            self._free_slots()
            self._make_slots(schedule)
        self.schedule = schedule
        self._position = {u: k for k, u in enumerate(schedule)}
        self._start(0)

    # --- loads -----------------------------------------------------------------------------------
    def _slot_view(self, n: int) -> memoryview:
        return memoryview(self._host_slots[n % self.depth].numpy())

    def _read_chunk(self, unit: str, chunk: tuple[int, int], view: memoryview) -> None:
        self._clock.begin()
        try:
            self.offload.read_chunk(self._reader, unit, chunk, view)
        finally:
            self._clock.end()

    def _submit(self, n: int) -> None:
        unit = self.schedule[n % len(self.schedule)]
        if unit in self._host_resident:
            self._pending[n] = []
            return
        if self.cuda:
            self._copied[n % self.depth].synchronize()  # the host slot's previous H2D must be done
        view = self._slot_view(n)
        self._pending[n] = [(c, self._pool.submit(self._read_chunk, unit, c, view))
                            for c in self.offload.units[unit].chunks()]

    def _start(self, position: int) -> None:
        """(Re)start the cyclic stream so that the next acquire is schedule[position]."""
        self._drain()
        self._next = position
        for n in range(position, position + self.depth):
            self._submit(n)

    def _drain(self) -> None:
        for futures in self._pending.values():
            for _, f in futures:
                f.cancel()
                if not f.cancelled():
                    f.exception()  # wait: a read still running owns its slot
        self._pending.clear()

    def _wait(self, n: int, unit: str) -> None:
        t = time.perf_counter()
        loads = self._pending.pop(n)
        # Every read of this load has landed before anything is re-read, repaired or raised: a read still
        # running would otherwise write into the slot after the next load reuses it.
        wait([f for _, f in loads])
        failed = []
        for chunk, f in loads:
            e = f.exception()
            if isinstance(e, (OSError, ModelFormatError)):
                failed.append(chunk)
            elif e is not None:
                raise e  # a bug, not the disk
        if failed:  # re-read once on this thread; failing again, the unit is rebuilt from the source
            self.offload.reread_or_repair(self._reader, unit, failed, self._slot_view(n), self.stats)
        self.stats.io_wait_s += time.perf_counter() - t
        self.stats.io_busy_s += self._clock.drain()

    # --- the runner's interface ------------------------------------------------------------------
    def acquire(self, unit: str) -> dict[str, torch.Tensor]:
        """Tensors of `unit`, valid until release(unit). Units are expected in schedule order; any other
        order (an interrupted forward pass) restarts the stream at `unit`, invalidating tensors handed out
        before."""
        n = self._next
        if self.schedule[n % len(self.schedule)] != unit or n not in self._pending:
            # out of order, or load n was already acquired and never released (a pass abandoned mid-way
            # or a failed read): start over, overwriting the abandoned slot
            self.stats.restarts += 1
            self._start(self._position[unit])
            n = self._next
        self._wait(n, unit)
        if unit not in self._host_resident:
            self.stats.disk_bytes += self.offload.units[unit].nbytes
            self.stats.units_streamed += 1
        if not self.cuda:
            return self._slot_views(n % self.depth, unit, self._host_slots)
        s = n % self.depth
        src = self._host_resident.get(unit, self._host_slots[s])
        dev = self._dev_slots[s]
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._computed[s])  # compute on the slot's previous unit is done
            dev[:src.numel()].copy_(src[:src.numel()], non_blocking=True)
            self._copied[s].record(self._copy_stream)
        torch.cuda.current_stream(self.device).wait_event(self._copied[s])
        self.stats.h2d_bytes += src.numel()
        return self._slot_views(s, unit, self._dev_slots)

    def _slot_views(self, s: int, unit: str, slots: list[torch.Tensor]) -> dict:
        """The unit's tensors as views of slot s, built once per (slot, unit): a unit's tensors sit at the same
        offsets every time it lands in the same slot, so a steady-state acquire makes no tensor at all (building
        ~20 views and QuantTensors cost ~0.25 ms a layer: 8% of a TinyLlama int4 token)."""
        key = (s, unit)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = self.offload.views(unit, slots[s])
        return views

    def release(self, unit: str) -> None:
        n = self._next
        if self.cuda:
            self._computed[n % self.depth].record(torch.cuda.current_stream(self.device))
        self._next = n + 1
        self._submit(n + self.depth)

    def settle(self) -> None:
        """Block until no read is in flight (every submitted load has landed or failed; failures are reported
        by the acquire that needs them). For measurements that must not overlap I/O with compute."""
        wait([f for loads in self._pending.values() for _, f in loads])

    def close(self) -> None:
        """Stop reading and free the slots. Tensors handed out must be dropped before (see AlignedBuffer)."""
        self._drain()
        self._views.clear()
        self._pool.shutdown(wait=True)
        self._reader.close()
        self._free_slots()

    def _free_slots(self) -> None:
        self._host_slots = []
        for b in self._buffers:
            try:
                b.close()
            except BufferError:
                # Views are still alive (say, in the traceback of a ChecksumError being reported); each holds
                # the mapping, which is unmapped when the last of them goes.
                pass
        self._buffers = []
