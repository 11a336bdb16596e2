"""The offload store's manifest is checksummed and bound to the source (issue 23): a manifest edited by hand, or
copied from another source, is never used. Every kind of edit, with its checksum left stale or recomputed, ends
in the resident run's logits (the store rebuilt or repaired) or in a clear error, never in wrong numbers."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers import engine_logits, runner_engine

from tierlm.engine.runner import Runner
from tierlm.memory.directio import ALIGN
from tierlm.offload.disk_manifest import SUM_FIELD, manifest_checksum
from tierlm.offload.disk_store import DATA_FILE, MANIFEST, ChecksumError, OffloadStore
from tierlm.offload.tier import Tier
from tierlm.offload.units import EMBED, HEAD, layer_unit
from tierlm.offload.weight_store import WeightStore
from tierlm.quant.scheme import QuantScheme
from tierlm.weights import open_model

K = Tier.DISK
PROMPT = [3, 17, 99, 42, 250, 7, 7, 301]
NAME = "qwen2"  # 2 layers with optional q/k/v biases, an untied head: every unit kind is on disk


def _logits(tok, store: WeightStore) -> torch.Tensor:
    engine = runner_engine(Runner(store, torch.float32, max_context=64), tok)
    try:
        return engine_logits(engine, PROMPT, steps=2)[0]
    finally:
        engine.kv.release()


def _on_disk(path, off) -> WeightStore:
    """Every unit streamed from the offload store in `off` (opened, or rebuilt when it does not verify)."""
    return WeightStore.load_placed(open_model(path), torch.float32, torch.device("cpu"), [K, K], K, K,
                                   progress=False, ring_depth=2, offload_dir=off)


@pytest.fixture(scope="module")
def path(tiny_models):
    return tiny_models[NAME].path


@pytest.fixture(scope="module")
def tok(path):
    return open_model(path).tokenizer


@pytest.fixture(scope="module")
def resident(path, tok):
    return _logits(tok, WeightStore.load_resident(open_model(path), torch.float32, progress=False))


@pytest.fixture
def built(path, tmp_path):
    """An all-disk store of the model in tmp_path/off -> (directory, its pristine manifest text)."""
    off = tmp_path / "off"
    _on_disk(path, off).close()
    return off, (off / MANIFEST).read_text()


def _swap_units(m: dict) -> None:
    a, b = m["units"][layer_unit(0)], m["units"][layer_unit(1)]
    a["offset"], b["offset"] = b["offset"], a["offset"]


def _add_unit(m: dict) -> None:
    """A third layer's record, placed after the data (as from a model with more layers)."""
    m["units"]["layers.7"] = {**m["units"][layer_unit(1)], "name": "layers.7", "offset": m["data_bytes"]}
    m["data_bytes"] += m["units"]["layers.7"]["nbytes"]


def _tensors(m: dict) -> list[dict]:
    return m["units"][layer_unit(1)]["tensors"]


EDITS = {  # what a hand edit changes -> (the edit, the warning when its checksum is recomputed: None = no warning)
    "tensor offset onto another tensor": (lambda m: _tensors(m)[3].update(offset=_tensors(m)[1]["offset"]),
                                          "'wo' of unit 'layers.1' starts at"),
    "tensor offset moved": (lambda m: _tensors(m)[1].update(offset=_tensors(m)[1]["offset"] + ALIGN),
                            "starts at"),
    "shape transposed": (lambda m: _tensors(m)[1].update(shape=_tensors(m)[1]["shape"][::-1]),
                         "does not hold what this model stores there"),
    "dtype": (lambda m: _tensors(m)[1].update(dtype="bfloat16"), "of bfloat16 needs"),
    "tensor renamed": (lambda m: _tensors(m)[1].update(name="wq"), "does not hold what this model stores"),
    "unit offset": (lambda m: m["units"][HEAD].update(offset=m["units"][HEAD]["offset"] + ALIGN),
                    "starts at"),
    "data size": (lambda m: m.update(data_bytes=m["data_bytes"] + ALIGN), "it says layers.bin holds"),
    "row sums dropped": (lambda m: m["units"][EMBED].update(row_sums=[]), "lacks row checksums"),
    "a unit of another model": (_add_unit, "a unit 'layers.7' this model does not have"),
    "fingerprint": (lambda m: m.update(fingerprint="0" * 64), None),  # recomputed: as another source's store
    "units swapped": (_swap_units, None),  # recomputed: each unit fails its sums and is repaired where it is
}


def _edit(off, change, reseal: bool) -> None:
    m = json.loads((off / MANIFEST).read_text())
    change(m)
    if reseal:  # as someone who knows the format would
        m[SUM_FIELD] = manifest_checksum({k: v for k, v in m.items() if k != SUM_FIELD}, m["fingerprint"])
    (off / MANIFEST).write_text(json.dumps(m, indent=1))  # laid out anew: the checksum covers content, not layout


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tierlm.offload" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_manifest_fails_its_checksum_and_the_store_is_rebuilt(path, tok, built, resident, caplog, edit):
    off, pristine = built
    _edit(off, EDITS[edit][0], reseal=False)
    store = _on_disk(path, off)
    try:
        assert torch.equal(_logits(tok, store), resident)
        assert store.stats.repairs == 0  # the store was rebuilt whole, not patched
    finally:
        store.close()
    (line,) = _warnings(caplog)
    assert "checksum does not match its content" in line and "rebuilding" in line and "\n" not in line
    assert (off / MANIFEST).read_text() == pristine  # the same source builds the same store


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_with_its_checksum_recomputed_is_caught_by_the_records_or_the_sums(path, tok, built, resident,
                                                                                   caplog, edit):
    change, needle = EDITS[edit]
    off, pristine = built
    _edit(off, change, reseal=True)
    store = _on_disk(path, off)
    try:
        assert torch.equal(_logits(tok, store), resident)
        assert store.stats.repairs == (2 if edit == "units swapped" else 0)
    finally:
        store.close()
    if needle is None:
        assert _warnings(caplog) == []  # an intact manifest: an ordinary rebuild, or bytes healed on read
    else:
        (line,) = _warnings(caplog)
        assert needle in line and "\n" not in line, line
    if edit != "units swapped":  # (that store is kept: its bytes were rewritten where its manifest says)
        assert (off / MANIFEST).read_text() == pristine


def test_a_unit_sum_edited_with_the_checksum_recomputed_is_a_clear_error(path, tok, built):
    """The bytes fail the edited sum, and a rebuild from the source gives the same bytes, so no sum is met: an
    error naming the unit, and the data file as it was."""
    off, _ = built
    _edit(off, lambda m: m["units"][layer_unit(1)]["chunk_sums"].__setitem__(0, 12345), reseal=True)
    data = (off / DATA_FILE).read_bytes()
    store = _on_disk(path, off)
    try:
        with pytest.raises(ChecksumError, match=r"layers\.1.*does not match the store's checksums"):
            _logits(tok, store)
    finally:
        store.close()
    assert (off / DATA_FILE).read_bytes() == data


@pytest.mark.parametrize("damage", ["not JSON", "truncated data"])
def test_an_unreadable_manifest_or_a_short_data_file_is_rebuilt_with_a_warning(path, tok, built, resident, caplog,
                                                                                damage):
    off, pristine = built
    if damage == "not JSON":
        (off / MANIFEST).write_text(pristine[: len(pristine) // 2])
    else:
        with open(off / DATA_FILE, "r+b") as f:
            f.truncate(ALIGN)
    store = _on_disk(path, off)
    try:
        assert torch.equal(_logits(tok, store), resident)
    finally:
        store.close()
    (line,) = _warnings(caplog)
    assert ("not valid JSON" if damage == "not JSON" else f"{DATA_FILE} is {ALIGN} bytes") in line


def test_a_store_of_the_previous_format_is_rebuilt_quietly(path, built, caplog):
    """Version 5 had no manifest checksum: such a store is an ordinary rebuild, not a corrupt one."""
    off, pristine = built
    old = json.loads(pristine)
    del old[SUM_FIELD]
    (off / MANIFEST).write_text(json.dumps({**old, "version": 5}))
    OffloadStore.open_or_build(open_model(path), [layer_unit(0)], torch.float32, off, progress=False)
    assert _warnings(caplog) == [] and json.loads((off / MANIFEST).read_text())["version"] > 5


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_every_store_the_build_writes_passes_its_checks_and_is_reused(tiny, tmp_path, caplog, quant):
    """The checks describe exactly what the build writes (every model kind and quantisation): a fresh store
    reopens as it is, with no warning and no rewrite."""
    source = open_model(tiny.path)
    units = [layer_unit(i) for i in range(source.config.num_layers)] + [HEAD, EMBED]
    dtype, scheme = (torch.float32, QuantScheme()) if quant == "none" else (torch.bfloat16, QuantScheme.parse(quant))
    off = tmp_path / "off"
    OffloadStore.open_or_build(source, units, dtype, off, progress=False, quant=scheme)
    stamp = (off / DATA_FILE).stat().st_mtime_ns, (off / MANIFEST).stat().st_mtime_ns
    store = OffloadStore.open_or_build(open_model(tiny.path), units, dtype, off, progress=False, quant=scheme)
    assert ((off / DATA_FILE).stat().st_mtime_ns, (off / MANIFEST).stat().st_mtime_ns) == stamp
    assert sorted(store.units) == sorted(units) and _warnings(caplog) == []
