"""The offload store's manifest: its encoding, its checksum bound to the source, and the checks it must pass
before the store is used (disk_store.py opens stores, disk_build.py writes them; the format is disk_layout.py).

Why: the manifest says where every tensor's bytes are and what they mean (offset, shape, dtype) and holds the
units' checksums, so a hand-edited one would make the model silently wrong. Three defences, in order:
- the checksum, an HMAC-SHA256 keyed by the source fingerprint over the canonical JSON of everything but the
  checksum field: an edited field, or a manifest copied from another source's store, fails it. NOTE: the key
  is no secret; this detects edits and copies, it does not stop someone who recomputes it. What does:
- the records' structure: every unit and tensor packed exactly as the build packs them (in offset order, each
  at the aligned end of the one before, so no extent overlaps another or leaves layers.bin), each tensor's
  bytes = prod(shape) * itemsize, one chunk sum per chunk; and their layout is the one this source, dtype and
  quant scheme give (tensor names, dtypes, shapes, quantised metadata), so no shape or offset can be moved;
- the bytes themselves: every chunk is checked against its sum as it is read (disk_store.read_chunk).
A manifest that fails any of these is never used: the store is rebuilt (disk_store decides and says why).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import asdict

import torch

from tierlm.config import STORAGE_DTYPES, ModelConfig
from tierlm.errors import ModelFormatError
from tierlm.memory.directio import ALIGN, align_up
from tierlm.offload import disk_layout as layout
from tierlm.offload.disk_layout import STORE_VERSION, StoredTensor, StoredUnit
from tierlm.offload.units import EMBED, HEAD, layer_unit, unit_tensors
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import part_specs

SUM_FIELD = "checksum"
_SUM64 = 1 << 64  # chunk and row sums are XXH3-64


class StaleManifest(Exception):
    """An ordinary reason to rebuild: the store is from another tierlm version, source or chunk size."""


class CorruptManifest(ModelFormatError):
    """The manifest is unreadable, edited or inconsistent: never to be used."""


def manifest_checksum(content: dict, fingerprint: str) -> str:
    """HMAC-SHA256 keyed by `fingerprint` over `content` in canonical JSON (sorted keys, no spaces), so the sum
    does not depend on how the file's JSON is laid out, only on what it says."""
    canon = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hmac.new(fingerprint.encode(), canon.encode(), hashlib.sha256).hexdigest()


def encode_manifest(units: dict[str, StoredUnit], fingerprint: str) -> str:
    """The manifest.json text of a store of `units` built from the source `fingerprint` names."""
    content = {"version": STORE_VERSION, "fingerprint": fingerprint, "chunk_bytes": layout.CHUNK_BYTES,
               "data_bytes": sum(s.nbytes for s in units.values()), "units": {k: asdict(s) for k, s in units.items()}}
    return json.dumps({**content, SUM_FIELD: manifest_checksum(content, fingerprint)})


def decode_manifest(text: str | bytes, fingerprint: str) -> tuple[dict[str, StoredUnit], int]:
    """manifest.json text -> (units, data_bytes), checked against the source `fingerprint` names and in its
    structure (check_records). Raises StaleManifest (another version/source/chunk size) or CorruptManifest."""
    try:
        m = json.loads(text)
    except ValueError:
        raise CorruptManifest("it is not valid JSON") from None
    if not isinstance(m, dict):
        raise CorruptManifest("it is not a JSON object")
    if m.get("version") != STORE_VERSION:
        raise StaleManifest(f"it is format version {m.get('version')!r}, this tierlm writes {STORE_VERSION}")
    # Keyed by the fingerprint the manifest names, so an intact store of another source is told apart (an
    # ordinary rebuild) from an edited one; accepted only when that fingerprint is also this source's.
    own = m.get("fingerprint")
    want = manifest_checksum({k: v for k, v in m.items() if k != SUM_FIELD}, own) if isinstance(own, str) else ""
    if not isinstance(m.get(SUM_FIELD), str) or not want or not hmac.compare_digest(m[SUM_FIELD], want):
        raise CorruptManifest("its checksum does not match its content (edited by hand?)")
    if own != fingerprint:
        raise StaleManifest("it was built from another source (or the source changed)")
    if m.get("chunk_bytes") != layout.CHUNK_BYTES:
        raise StaleManifest(f"its chunk size is {m.get('chunk_bytes')!r}, not {layout.CHUNK_BYTES}")
    try:
        units = {k: _unit(v) for k, v in m["units"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise CorruptManifest(f"a unit record is malformed ({type(e).__name__}: {e})") from None
    check_records(units, m.get("data_bytes"))
    return units, m["data_bytes"]


def _unit(v: dict) -> StoredUnit:
    return StoredUnit(**{**v, "tensors": [StoredTensor(**t) for t in v["tensors"]]})


def _is_int(x: object, lo: int = 0, hi: int | None = None) -> bool:
    return type(x) is int and x >= lo and (hi is None or x < hi)  # noqa: E721 (bool is no int here)


def check_records(units: dict[str, StoredUnit], data_bytes: object) -> None:
    """The structure every store the build writes has (raises CorruptManifest naming the first violation):
    in offset order the units tile layers.bin from 0 to data_bytes, each an ALIGN multiple; inside each,
    tensors tile the extent likewise (each at the aligned end of the one before); a tensor's bytes are
    prod(shape) * itemsize of a storage dtype; one sum per chunk, one per row of a dense embed/head matrix."""
    pos = 0
    for key, s in sorted(units.items(), key=lambda kv: kv[1].offset if _is_int(kv[1].offset) else -1):
        where = f"unit {key!r}"
        if s.name != key:
            raise CorruptManifest(f"{where} is named {s.name!r}")
        if not _is_int(s.offset) or s.offset != pos:
            raise CorruptManifest(f"{where} starts at {s.offset!r}, not at {pos} where the unit before it ends")
        if not _is_int(s.nbytes) or s.nbytes % ALIGN:
            raise CorruptManifest(f"{where} has a size of {s.nbytes!r} bytes, not a multiple of {ALIGN}")
        _check_tensors(where, s)
        chunks = -(-s.nbytes // layout.CHUNK_BYTES)
        if not isinstance(s.chunk_sums, list) or len(s.chunk_sums) != chunks \
                or not all(_is_int(c, 0, _SUM64) for c in s.chunk_sums):
            raise CorruptManifest(f"{where} needs {chunks} chunk checksums")
        if not isinstance(s.row_sums, list) or not all(_is_int(c, 0, _SUM64) for c in s.row_sums):
            raise CorruptManifest(f"{where} has malformed row checksums")
        if s.row_sums and (not s.tensors or not layout.rows_readable(s.quant) or len(s.row_sums) != s.matrix_rows()[0]):
            raise CorruptManifest(f"{where} has {len(s.row_sums)} row checksums, not one per row of its matrix")
        pos += s.nbytes
    if not _is_int(data_bytes) or data_bytes != pos:
        raise CorruptManifest(f"its units end at byte {pos}, it says layers.bin holds {data_bytes!r}")


def _check_tensors(where: str, s: StoredUnit) -> None:
    pos, names = 0, set()
    for t in s.tensors:
        what = f"tensor {t.name!r} of {where}"
        if not isinstance(t.name, str) or t.name in names:
            raise CorruptManifest(f"{what}: a name twice or not a string")
        names.add(t.name)
        if t.dtype not in STORAGE_DTYPES or not isinstance(t.shape, list) or not all(map(_is_int, t.shape)):
            raise CorruptManifest(f"{what} has dtype {t.dtype!r} and shape {t.shape!r}")
        if not _is_int(t.offset) or t.offset != pos:
            raise CorruptManifest(f"{what} starts at {t.offset!r}, not at {pos} where the tensor before it ends")
        if t.nbytes != math.prod(t.shape) * STORAGE_DTYPES[t.dtype].itemsize:
            raise CorruptManifest(f"{what} is {t.nbytes!r} bytes, its shape {t.shape} of {t.dtype} needs "
                                  f"{math.prod(t.shape) * STORAGE_DTYPES[t.dtype].itemsize}")
        pos += align_up(t.nbytes)
    if pos != s.nbytes:
        raise CorruptManifest(f"{where}: its tensors end at byte {pos} of its {s.nbytes}")


def expected_layout(cfg: ModelConfig, unit: str, dtype: torch.dtype, quant: QuantScheme,
                    present: set[str]) -> tuple[list[tuple[str, str, list[int]]], dict[str, dict]]:
    """(name, dtype, shape) of every tensor the build stores for `unit`, in order, and the quantised matrices'
    metadata: what disk_build._encode_unit writes for this config (optional tensors absent from `present`
    skipped), as unit_nbytes sizes it. Raises CorruptManifest for a unit name this model does not have."""
    layers = [layer_unit(i) for i in range(cfg.num_layers)]
    if unit not in (HEAD, EMBED, *layers):
        raise CorruptManifest(f"it names a unit {unit!r} this model does not have")
    out, metas = [], {}
    for spec in unit_tensors(cfg, unit):
        if not any(n in present for n in spec.source_names):
            continue
        scheme = QuantScheme() if spec.dequantized else spec.scheme(quant)
        if not scheme.enabled:
            out.append((spec.leaf, str(dtype).removeprefix("torch."), list(spec.shape)))
            continue
        metas[spec.leaf] = {"kind": scheme.kind, "shape": list(spec.shape),
                            "group_size": scheme.group_size or spec.shape[1]}  # per channel: one group of K
        if scheme.kind == "ggml":
            metas[spec.leaf]["runs"] = [list(r) for r in scheme.runs]
        for part, (shape, part_dtype) in part_specs(scheme, spec.shape, dtype).items():
            out.append((f"{spec.leaf}.{part}", str(part_dtype).removeprefix("torch."), list(shape)))
    return out, metas


def check_layout(units: dict[str, StoredUnit], cfg: ModelConfig, dtype: torch.dtype, quant: QuantScheme,
                 present: set[str]) -> None:
    """Every unit's tensors are the ones expected_layout gives, and only a dense embed/head has row sums
    (raises CorruptManifest naming the first difference)."""
    for key, s in units.items():
        tensors, metas = expected_layout(cfg, key, dtype, quant, present)
        got = [(t.name, t.dtype, t.shape) for t in s.tensors]
        if got != tensors:
            diff = next(((g, w) for g, w in zip(got, tensors) if g != w), (len(got), len(tensors)))
            raise CorruptManifest(f"unit {key!r} does not hold what this model stores there "
                                  f"(recorded vs expected: {diff[0]} vs {diff[1]})")
        if s.quant != metas:
            raise CorruptManifest(f"unit {key!r} has quantisation metadata {s.quant}, expected {metas}")
        rows = key in (HEAD, EMBED) and layout.rows_readable(metas)
        if rows != bool(s.row_sums):
            raise CorruptManifest(f"unit {key!r} {'lacks' if rows else 'has'} row checksums")
