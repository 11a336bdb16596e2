"""WeightStore: the runner's only way to reach weights, whatever tier each unit lives on.

    acquire(i) / release(i)   layer i's weights (resident, or streamed through the ring)
    acquire_head() / release_head()   the lm_head matrix
    embed(tokens)             embedding rows (resident gather, or on-demand row reads from disk)

Invariant: a unit's tensors are valid from acquire until its release; the runner releases every unit it
acquires, in order. Resident tensors are loaded from the model source; the rest come from the offload
store. After loading, the source is closed and its pages evicted, so RSS holds only what the plan says.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from tierlm.config import ModelConfig
from tierlm.memory import allocator
from tierlm.memory.directio import AlignedBuffer, DirectFile, drop_from_page_cache
from tierlm.offload.disk_store import OffloadStore
from tierlm.offload.planner import Placement
from tierlm.offload.stats import TierStats
from tierlm.offload.streamer import Streamer
from tierlm.offload.tier import Tier
from tierlm.offload.units import EMBED, HEAD, layer_unit, unit_tensors
from tierlm.model import registry
from tierlm.model.family import Matrix
from tierlm.progress import progress_bar
from tierlm.quant import kernels
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import QuantTensor
from tierlm.weights.source import ModelSource
from tierlm.offload.unit_load import load_unit_tensor

def _nbytes(t: torch.Tensor | QuantTensor | None) -> int:
    if isinstance(t, QuantTensor):
        return t.nbytes
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class _Rows:
    """On-demand embedding rows from the offload store: one small aligned buffer, one reader."""

    offload: OffloadStore
    unit: str
    reader: DirectFile
    buf: AlignedBuffer = field(init=False)

    def __post_init__(self) -> None:
        self.buf = AlignedBuffer(self.offload.row_buffer_bytes(self.unit))

    def close(self) -> None:
        self.reader.close()
        self.buf.close()


# A layer's weights: the model's LayerWeights (model/registry.py: registry.for_config(cfg).LayerWeights).
Layer = Any


def _evict_source(source: ModelSource) -> None:
    """The source was read through the page cache; drop those pages so it is not a hidden tier."""
    for f in source.files():
        drop_from_page_cache(f)


class WeightStore:
    def __init__(self, config: ModelConfig, norm: torch.Tensor, rope_freqs: torch.Tensor | None,
                 layers: list[Layer | None], tiers: list[Tier], head_weight: Matrix | None,
                 embed_weight: Matrix | None, head_tier: Tier = Tier.DEVICE, embed_tier: Tier = Tier.DEVICE,
                 streamer: Streamer | None = None, rows: _Rows | None = None, stats: TierStats | None = None,
                 dtype: torch.dtype = torch.float32, quant: QuantScheme = QuantScheme(),
                 offload: OffloadStore | None = None):
        self.config = config
        self.layer_weights = registry.for_config(config).LayerWeights  # how the model holds a layer
        self.dtype = dtype  # compute (activation) dtype: quantised matrices are prepared for it
        self.quant = quant
        self.norm = norm  # [H], always resident
        self.rope_freqs = rope_freqs  # [hd/2] or None, fp32
        self._layers = layers  # resident LayerWeights, None where streamed
        self.tiers = tiers  # tier of each layer, index = layer number
        self.head_weight = head_weight  # [V, H] when resident (quantised under a quant scheme)
        self.embed_weight = embed_weight  # [V, H] when resident (the same matrix as head_weight when tied)
        self.head_tier, self.embed_tier = head_tier, embed_tier
        self.streamer, self._rows = streamer, rows
        self.stats = stats or TierStats()
        self.offload = offload  # the offload store (None: nothing off memory, and nothing can move there)
        self._owned: dict[int, AlignedBuffer] = {}  # promoted layers: their bytes, read from the offload store
        self.stream_args = (2, 4, True)  # (ring depth, I/O threads, O_DIRECT) for a streamer made by a migration

    @classmethod
    def load_resident(cls, source: ModelSource, dtype: torch.dtype, device: torch.device | str = "cpu",
                      progress: bool | None = None, quant: QuantScheme = QuantScheme()) -> "WeightStore":
        """Read every tensor into `device` memory in `dtype` (dequantising as needed), or quantised."""
        n = source.config.num_layers
        return cls.load_placed(source, dtype, torch.device(device), [Tier.DEVICE] * n, Tier.DEVICE, Tier.DEVICE,
                               progress, quant=quant)

    @classmethod
    def load_planned(cls, source: ModelSource, dtype: torch.dtype, device: torch.device | str, plan: Placement,
                     offload_dir: Path, progress: bool | None = None, direct: bool = True,
                     io_threads: int = 4, quant: QuantScheme = QuantScheme(),
                     migratable: bool = False) -> "WeightStore":
        """Resident units from the source; the rest written once to (or reused from) the offload store and
        streamed with `io_threads` concurrent reads (the queue depth calibration found fastest).
        migratable: every layer is in the offload store, so any can be demoted at run time (demote())."""
        return cls.load_placed(source, dtype, torch.device(device), list(plan.layer_tiers), plan.head_tier,
                               plan.embed_tier, progress, plan.ring_depth, offload_dir, direct, io_threads, quant,
                               migratable)

    @classmethod
    def load_placed(cls, source: ModelSource, dtype: torch.dtype, device: torch.device, tiers: list[Tier],
                    head_tier: Tier, embed_tier: Tier, progress: bool | None, ring_depth: int = 0,
                    offload_dir: Path | None = None, direct: bool = True, io_threads: int = 4,
                    quant: QuantScheme = QuantScheme(), migratable: bool = False) -> "WeightStore":
        """An explicit placement: tier of every layer, of the head and of the embedding (tests force every mix
        through here; load_planned passes the planner's)."""
        cfg = source.config
        tied = cfg.tie_word_embeddings
        if tied:
            embed_tier = head_tier  # one matrix: rows come from wherever the head lives
        # A tied head streamed under a requantising scheme cannot serve rows from its packed form on disk: the
        # embedding then gets a dense unit of its own in the offload store (rows read on demand). A head in GGUF
        # blocks serves its rows from them.
        rows_unit = EMBED if not tied or quant.kind in ("int8", "int4") else HEAD
        # Streaming order = access order: layers, then the head. The embedding is never streamed whole.
        schedule = [layer_unit(i) for i, t in enumerate(tiers) if t != Tier.DEVICE]
        schedule += [HEAD] if head_tier != Tier.DEVICE else []
        offloaded = schedule + ([EMBED] if rows_unit == EMBED and embed_tier != Tier.DEVICE else [])
        if migratable:  # resident layers too: a migration reads or streams them from here
            offloaded += [layer_unit(i) for i, t in enumerate(tiers) if t == Tier.DEVICE]
        offload = None
        if offloaded:
            if offload_dir is None:
                raise ValueError("units placed off the device need an offload_dir")
            offload = OffloadStore.open_or_build(source, offloaded, dtype, offload_dir, progress, quant)

        present = set(source.tensor_names())
        resident = [i for i, t in enumerate(tiers) if t == Tier.DEVICE]
        bar = progress_bar(len(resident) + 3, "loading weights", progress, unit="unit")

        def get(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor | None:
            return source.load(name, as_dtype).to(device) if name in present else None

        def unit(name: str) -> dict[str, Matrix | None]:
            out = {t.leaf: load_unit_tensor(source, t, dtype, quant, present) for t in unit_tensors(cfg, name)}
            return {k: None if v is None else v.to(device) for k, v in out.items()}

        # The head first: quantising it holds its whole matrix in fp32 for a moment (262 MiB for TinyLlama), and
        # that transient must come while little else is resident, or it lands on top of every layer.
        head = unit(HEAD)["lm_head"] if head_tier == Tier.DEVICE else None
        embed = head if tied and head is not None else unit(EMBED)["embed"] if embed_tier == Tier.DEVICE else None
        layers: list[Layer | None] = [None] * cfg.num_layers
        make_layer = registry.for_config(cfg).LayerWeights
        for i in resident:
            layers[i] = make_layer(**unit(layer_unit(i)))
            bar.update()
        norm, rope_freqs = get("norm"), get("rope_freqs", torch.float32)  # rope math stays fp32
        bar.update(3)
        bar.close()
        source.close()
        if offload is not None:
            _evict_source(source)
        streamer = rows = None
        stats = TierStats()
        if schedule:
            host = {u: cls._pin(offload, u) for u in schedule if cls._tier_of(u, tiers, head_tier) == Tier.HOST}
            streamer = Streamer(offload, schedule, ring_depth, stats, device, host, io_threads, direct)
        if embed is None:
            rows = _Rows(offload, rows_unit, offload.open_reader(direct))
        ws = cls(cfg, norm, rope_freqs, layers, tiers, head, embed, head_tier, embed_tier, streamer, rows, stats,
                 dtype, quant, offload)
        ws.stream_args = (ring_depth or 2, io_threads or 4, direct)
        return ws

    @staticmethod
    def _tier_of(unit: str, tiers: list[Tier], head_tier: Tier) -> Tier:
        return head_tier if unit == HEAD else tiers[int(unit.removeprefix("layers."))]

    @staticmethod
    def _pin(offload: OffloadStore, unit: str) -> torch.Tensor:
        """CUDA HOST tier: the unit's extent read once into pinned memory (copied to the device per use)."""
        buf = AlignedBuffer(offload.units[unit].nbytes)
        with offload.open_reader() as reader:
            offload.read_unit(reader, unit, buf)
        pinned = buf.tensor().clone().pin_memory()
        buf.close()
        return pinned

    # --- the runner's interface ------------------------------------------------------------------
    def acquire(self, i: int) -> Layer:
        """Layer i's weights, valid until release(i)."""
        if self._layers[i] is not None:
            return self._layers[i]
        # NOTE: the stored parts are the kernel's operands (kernel form): views of the ring slot, no preparation
        return self.layer_weights(**self.streamer.acquire(layer_unit(i)))

    def release(self, i: int) -> None:
        if self._layers[i] is None:
            self.streamer.release(layer_unit(i))

    def acquire_head(self) -> Matrix:
        """lm_head [V, H], valid until release_head()."""
        if self.head_weight is not None:
            return self.head_weight
        return self.streamer.acquire(HEAD)["lm_head"]

    def release_head(self) -> None:
        if self.head_weight is None:
            self.streamer.release(HEAD)

    def skip_head(self) -> None:
        """The head is not needed this pass: keep the stream in its cyclic order without computing."""
        if self.head_weight is None:
            self.streamer.acquire(HEAD)
            self.streamer.release(HEAD)

    def embed(self, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        """tokens [B, T] int64 -> [B, T, H] on `device`."""
        if self.embed_weight is not None:
            return kernels.embedding_rows(self.embed_weight, tokens.to(device), self.dtype)
        unique, inverse = torch.unique(tokens, return_inverse=True)  # read each distinct row once
        rows = self._rows.offload.read_rows(self._rows.reader, self._rows.unit, unique.tolist(), self._rows.buf,
                                          self.stats)
        self.stats.disk_bytes += len(unique) * self._rows.offload.units[self._rows.unit].matrix_rows()[1]
        return rows.to(device, self.dtype)[inverse.to(device)]  # [B, T, H]

    # --- migration: offload/migration.py decides, this moves (between passes: nothing acquired is held) ----------
    def resident_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.tiers) if t == Tier.DEVICE]

    def demote(self, layers: list[int]) -> int:
        """Resident layers leave memory and stream from the offload store; returns the bytes freed."""
        freed = 0
        for i in layers:
            freed += self.layer_nbytes(i)
            self._layers[i] = None
            self.tiers[i] = Tier.DISK
            if (buf := self._owned.pop(i, None)) is not None:
                buf.close()
        self._restream()
        allocator.trim()  # small resident tensors were heap memory
        return freed

    def promote(self, layers: list[int]) -> int:
        """Streamed layers read once (verified) into memory of their own: the very bytes that streamed, so every
        output is bit-identical whichever tier a layer is on. Returns the bytes now held."""
        for i in layers:
            self.tiers[i] = Tier.DEVICE
        self._restream()  # first: a stream left empty frees its ring before the layers take memory
        with self.offload.open_reader(self.stream_args[2]) as reader:
            for i in layers:
                unit = layer_unit(i)
                buf = AlignedBuffer(self.offload.units[unit].nbytes)
                self._layers[i] = self.layer_weights(**self.offload.read_unit(reader, unit, buf, self.stats))
                self._owned[i] = buf
        return sum(self.layer_nbytes(i) for i in layers)

    def _restream(self) -> None:
        schedule = [layer_unit(i) for i, t in enumerate(self.tiers) if t != Tier.DEVICE]
        schedule += [HEAD] if self.head_tier != Tier.DEVICE else []
        if not schedule:
            if self.streamer is not None:
                self.streamer.close()
                self.streamer = None
        elif self.streamer is None:
            depth, threads, direct = self.stream_args
            self.streamer = Streamer(self.offload, schedule, depth, self.stats, torch.device("cpu"), None, threads,
                                     direct)
        else:
            self.streamer.reschedule(schedule)

    # --- accounting ------------------------------------------------------------------------------
    def layer_nbytes(self, i: int) -> int:
        """Bytes of a resident layer (0 for a streamed one: it lives in the ring; a promoted one holds its unit's
        whole aligned extent)."""
        if i in self._owned:
            return self._owned[i].nbytes
        w = self._layers[i]
        return 0 if w is None else sum(_nbytes(getattr(w, f.name)) for f in fields(w))

    @property
    def ring_nbytes(self) -> int:
        """The streaming ring's slots (0 when nothing streams)."""
        return self.streamer.ring_bytes if self.streamer is not None else 0

    def nbytes_by_tier(self) -> dict[Tier, int]:
        """Bytes held in memory per tier by resident weights (the ring and KV are counted elsewhere)."""
        out = {t: 0 for t in Tier}
        for i in range(len(self.tiers)):
            out[Tier.DEVICE] += self.layer_nbytes(i)
        head = _nbytes(self.head_weight)
        out[Tier.DEVICE] += _nbytes(self.norm) + head + (0 if self.embed_weight is self.head_weight else _nbytes(self.embed_weight))
        return out

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
        self._layers = [None] * len(self._layers)  # promoted layers view their buffers: drop the views first
        for buf in self._owned.values():
            buf.close()
        self._owned.clear()
        if self._rows is not None:
            self._rows.close()
