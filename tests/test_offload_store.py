"""The offload store: aligned per-layer layout, exact round trip, reuse, rebuild, corruption detection and
repair, builds that fail or are killed leave nothing trusted, storage errors are one clear line."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import cached_pages, flip

from tierlm.errors import StorageError
from tierlm.offload import disk_build as offload_build
from tierlm.memory.directio import ALIGN, AlignedBuffer
from tierlm.memory.dirlock import dir_lock
from tierlm.offload.disk_store import DATA_FILE, MANIFEST, ChecksumError, OffloadStore
from tierlm.offload.stats import TierStats
from tierlm.offload.units import EMBED, HEAD, layer_unit
from tierlm.quant.scheme import QuantScheme
from tierlm.weights import open_model
from tierlm.weights.names import layer_name


@pytest.fixture
def model_dir(tiny_models, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"].path, d)  # a private copy: one test edits it
    return d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact_and_aligned(model_dir, tmp_path, dtype):
    source = open_model(model_dir)
    layers = list(range(source.config.num_layers))
    units = [layer_unit(i) for i in layers] + [HEAD, EMBED]
    store = OffloadStore.open_or_build(source, units, dtype, tmp_path / "off", progress=False)
    buf = AlignedBuffer(store.max_unit_bytes())
    with store.open_reader() as reader:
        for i in layers:
            s = store.units[layer_unit(i)]
            assert s.offset % ALIGN == 0 and s.nbytes % ALIGN == 0
            assert all(t.offset % ALIGN == 0 for t in s.tensors)
            got = store.read_unit(reader, layer_unit(i), buf)
            assert set(got) == {"attn_norm", "wqkv", "bqkv", "wo", "ffn_norm", "w_gateup", "w_down"}
            fused = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gateup": ("w_gate", "w_up")}
            for leaf, t in got.items():
                want = torch.cat([source.load(layer_name(i, p), dtype) for p in fused.get(leaf, (leaf,))])
                assert torch.equal(t, want)
        assert torch.equal(store.read_unit(reader, HEAD, buf)["lm_head"], source.load("lm_head", dtype))
        embed = source.load("embed", dtype)
        rows = AlignedBuffer(store.row_buffer_bytes(EMBED))
        assert torch.equal(store.read_rows(reader, EMBED, [5, 0, 5, 63], rows), embed[[5, 0, 5, 63]])
    del got, t  # views into buf: the buffer cannot be closed while they live
    buf.close()
    rows.close()


def test_reused_when_unchanged_rebuilt_when_source_changes(model_dir, tmp_path):
    off = tmp_path / "off"
    two = [layer_unit(0), layer_unit(1)]
    OffloadStore.open_or_build(open_model(model_dir), two, torch.float32, off, progress=False)
    stamp = (off / DATA_FILE).stat().st_mtime_ns
    OffloadStore.open_or_build(open_model(model_dir), two, torch.float32, off, progress=False)
    assert (off / DATA_FILE).stat().st_mtime_ns == stamp  # reused, not rewritten
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new file: the fingerprint changes
    OffloadStore.open_or_build(open_model(model_dir), two, torch.float32, off, progress=False)
    assert (off / DATA_FILE).stat().st_mtime_ns != stamp
    stamp = (off / DATA_FILE).stat().st_mtime_ns
    OffloadStore.open_or_build(open_model(model_dir), [layer_unit(1)], torch.float32, off, progress=False)
    assert (off / DATA_FILE).stat().st_mtime_ns == stamp  # fewer units: the store holds them, reused
    OffloadStore.open_or_build(open_model(model_dir), [layer_unit(1), HEAD], torch.float32, off, progress=False)
    assert list(json.loads((off / MANIFEST).read_text())["units"]) == ["layers.1", "head"]  # a unit missing: rebuilt


def test_missing_manifest_means_rebuild(model_dir, tmp_path):
    off = tmp_path / "off"
    OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    (off / MANIFEST).unlink()  # as after a crash between the data rename and the manifest rename
    store = OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    assert (off / MANIFEST).is_file() and layer_unit(0) in store.units


def _corrupt(off, store, unit: str, row: int | None = None) -> None:
    """Flip a byte of `unit` on disk: inside row `row` of its first tensor, or in its second tensor."""
    s = store.units[unit]
    if row is None:
        flip(off / DATA_FILE, s.offset + s.tensors[1].offset + 7)
    else:
        flip(off / DATA_FILE, s.offset + row * (s.tensors[0].nbytes // s.tensors[0].shape[0]) + 3)


def test_corrupt_unit_and_row_are_rebuilt_from_the_source(model_dir, tmp_path):
    """Bytes that fail their checksum twice are rebuilt in place from the (unchanged) source: the reads return
    the right values, and the file is whole again afterwards."""
    off = tmp_path / "off"
    units = [layer_unit(0), layer_unit(1), EMBED]
    store = OffloadStore.open_or_build(open_model(model_dir), units, torch.float32, off, progress=False)
    good = (off / DATA_FILE).read_bytes()
    _corrupt(off, store, layer_unit(1))
    _corrupt(off, store, EMBED, row=9)
    assert (off / DATA_FILE).read_bytes() != good
    stats = TierStats()
    buf, rows = AlignedBuffer(store.max_unit_bytes()), AlignedBuffer(store.row_buffer_bytes(EMBED))
    source = open_model(model_dir)
    with store.open_reader() as reader:
        got = store.read_unit(reader, layer_unit(1), buf, stats)
        assert torch.equal(got["wqkv"], torch.cat([source.load(layer_name(1, p), torch.float32)
                                                   for p in ("wq", "wk", "wv")]))
        del got
        assert stats.repairs == 1 and stats.retries >= 1
        embed = source.load("embed", torch.float32)
        assert torch.equal(store.read_rows(reader, EMBED, [8, 9], rows, stats), embed[[8, 9]])
        assert stats.repairs == 2
    assert (off / DATA_FILE).read_bytes() == good  # fixed on disk, not only in memory
    buf.close()
    rows.close()


def test_a_corrupt_row_of_gguf_blocks_is_rebuilt(tiny_models, tmp_path):
    """An embedding kept in its GGUF blocks (Q5_0, scheme gguf-blocks) serves rows from them, each checked
    against its own checksum: a flipped byte in a row is re-read, then rebuilt from the source, and the rows are
    the source's dequantised rows."""
    from gguf import GGMLQuantizationType as Q
    from gguf_writer import write_gguf
    tm = tiny_models["qwen2"]
    path = write_gguf(tm.hf, tm.path, tmp_path / "m.gguf", Q.Q5_0)
    source = open_model(path)
    quant = QuantScheme.resolve("auto", None, source.storage_types(), source.head_storage_type(),
                                source.ggml_tensors())
    off = tmp_path / "off"
    store = OffloadStore.open_or_build(source, [EMBED], torch.float32, off, progress=False, quant=quant)
    assert store.units[EMBED].quant["embed"]["kind"] == "ggml"  # its blocks, not a dense copy
    good = (off / DATA_FILE).read_bytes()
    s = store.units[EMBED]
    flip(off / DATA_FILE, s.offset + 9 * s.matrix_rows()[1] + 3)
    stats, rows = TierStats(), AlignedBuffer(store.row_buffer_bytes(EMBED))
    with store.open_reader() as reader:
        got = store.read_rows(reader, EMBED, [8, 9], rows, stats)
    assert torch.equal(got, open_model(path).load("embed", torch.float32)[[8, 9]])
    assert stats.repairs == 1 and (off / DATA_FILE).read_bytes() == good
    rows.close()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_units_are_rebuilt_bit_for_bit(model_dir, tmp_path, quant):
    """Quantisation is deterministic, so a rebuilt quantised unit matches the store's checksums too."""
    off = tmp_path / "off"
    store = OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0), HEAD], torch.bfloat16, off,
                                       progress=False, quant=QuantScheme.parse(quant))
    good = (off / DATA_FILE).read_bytes()
    _corrupt(off, store, layer_unit(0))
    _corrupt(off, store, HEAD)
    stats, buf = TierStats(), AlignedBuffer(store.max_unit_bytes())
    with store.open_reader() as reader:
        store.read_unit(reader, layer_unit(0), buf, stats)
        store.read_unit(reader, HEAD, buf, stats)
    assert stats.repairs == 2 and (off / DATA_FILE).read_bytes() == good
    buf.close()


@pytest.mark.parametrize("change", ["touched", "removed"])
def test_corrupt_unit_with_a_changed_or_missing_source_is_a_clear_error(model_dir, tmp_path, change):
    off = tmp_path / "off"
    units = [layer_unit(0), layer_unit(1), EMBED]
    store = OffloadStore.open_or_build(open_model(model_dir), units, torch.float32, off, progress=False)
    _corrupt(off, store, layer_unit(1))
    _corrupt(off, store, EMBED, row=9)
    if change == "touched":
        weights = model_dir / "model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
        needle = "source .* changed since the store was built"
    else:
        shutil.rmtree(model_dir)
        needle = "source cannot be opened"
    bad = (off / DATA_FILE).read_bytes()
    buf, rows = AlignedBuffer(store.max_unit_bytes()), AlignedBuffer(store.row_buffer_bytes(EMBED))
    with store.open_reader() as reader:
        store.read_unit(reader, layer_unit(0), buf)  # untouched layer still verifies
        with pytest.raises(ChecksumError, match=rf"layers\.1.*after one re-read.*{needle}") as e:
            store.read_unit(reader, layer_unit(1), buf)
        assert "\n" not in str(e.value)
        del e  # its traceback holds views of buf
        store.read_rows(reader, EMBED, [8, 10], rows)  # neighbouring rows are fine
        with pytest.raises(ChecksumError, match=rf"row 9 of embed.*{needle}"):
            store.read_rows(reader, EMBED, [8, 9], rows)
    assert (off / DATA_FILE).read_bytes() == bad  # nothing written from a source that is not the one
    buf.close()
    rows.close()


def test_rebuilt_bytes_that_differ_from_the_manifest_are_never_written(model_dir, tmp_path):
    """Same source + same code => same bytes; when a rebuild disagrees with the recorded sums (here: a wrong sum
    in the manifest), it is an error and the file is left as it was."""
    off = tmp_path / "off"
    store = OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    s = store.units[layer_unit(0)]
    store.units[layer_unit(0)] = dataclasses.replace(s, chunk_sums=[s.chunk_sums[0] ^ 1, *s.chunk_sums[1:]])
    before = (off / DATA_FILE).read_bytes()
    buf = AlignedBuffer(store.max_unit_bytes())
    with store.open_reader() as reader, pytest.raises(ChecksumError, match="does not match the store's checksums"):
        store.read_unit(reader, layer_unit(0), buf)
    assert (off / DATA_FILE).read_bytes() == before
    buf.close()


def test_a_unit_still_corrupt_after_its_rebuild_is_an_error(model_dir, tmp_path, monkeypatch):
    off = tmp_path / "off"
    store = OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    _corrupt(off, store, layer_unit(0))
    monkeypatch.setattr(store, "repair", lambda unit, what: None)  # as a disk that does not keep what it is given
    stats, buf = TierStats(), AlignedBuffer(store.max_unit_bytes())
    with store.open_reader() as reader, pytest.raises(ChecksumError, match="still fails after it was rebuilt"):
        store.read_unit(reader, layer_unit(0), buf, stats)
    assert stats.repairs == 1
    buf.close()


def _leftovers(off) -> list[str]:
    return sorted(p.name for p in off.iterdir() if p.name != ".lock")


def _failing_write(monkeypatch, error: BaseException, after_units: int = 1) -> None:
    """Make the build fail while writing unit number `after_units` (0-based), after part of the data is out."""
    encode, seen = offload_build._encode_unit, []

    def fake(source, name, offset, dtype, quant, present, write):
        seen.append(name)
        if len(seen) <= after_units:
            return encode(source, name, offset, dtype, quant, present, write)
        write(memoryview(b"x" * 100))
        raise error
    monkeypatch.setattr(offload_build, "_encode_unit", fake)


def test_failed_build_leaves_no_temp_file_and_no_manifest(model_dir, tmp_path, monkeypatch):
    off = tmp_path / "off"
    units = [layer_unit(0), layer_unit(1)]
    OffloadStore.open_or_build(open_model(model_dir), units, torch.float32, off, progress=False)  # an old store
    _failing_write(monkeypatch, KeyboardInterrupt())  # as a kill that Python sees
    with pytest.raises(KeyboardInterrupt):
        OffloadStore.open_or_build(open_model(model_dir), [layer_unit(1), EMBED], torch.float32, off,
                                   progress=False)
    assert _leftovers(off) == []  # the old store is gone (untrusted once a build starts), and so is the new
    monkeypatch.undo()
    store = OffloadStore.open_or_build(open_model(model_dir), units, torch.float32, off, progress=False)
    assert _leftovers(off) == [DATA_FILE, MANIFEST] and sorted(store.units) == units


def test_temp_files_of_a_killed_build_are_removed_by_the_next(model_dir, tmp_path):
    off = tmp_path / "off"
    off.mkdir()
    for stale in (f"{DATA_FILE}.123.abcd.tmp", f"{MANIFEST}.123.abcd.tmp", f"{DATA_FILE}.tmp"):
        (off / stale).write_bytes(b"half")
    OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    assert _leftovers(off) == [DATA_FILE, MANIFEST]


def test_disk_full_while_writing_is_a_storage_error(model_dir, tmp_path, monkeypatch):
    off = tmp_path / "off"
    _failing_write(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(StorageError, match=rf"cannot write the offload store in {off}: No space left on device "
                                           r"\(needs .*iB, .*iB free\)"):
        OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0), layer_unit(1)], torch.float32, off,
                                   progress=False)
    assert _leftovers(off) == []


def test_too_little_free_space_fails_before_writing(model_dir, tmp_path, monkeypatch):
    off = tmp_path / "off"
    monkeypatch.setattr(offload_build.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 40, 1 << 40, 4096))
    with pytest.raises(StorageError, match=r"not enough free space \(needs .*KiB, 4.0 KiB free\)"):
        OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    assert _leftovers(off) == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_unwritable_offload_dir_is_a_storage_error(model_dir, tmp_path, monkeypatch, code):
    """(Tests run as root, which chmod does not stop: the refusal is simulated.)"""
    off = tmp_path / "off"
    real_open = Path.open

    def refuse(self, *args, **kw):
        if self.name.endswith(".tmp"):
            raise OSError(code, os.strerror(code), str(self))
        return real_open(self, *args, **kw)
    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(StorageError, match=f"cannot write the offload store in {off}: {os.strerror(code)}$"):
        OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    assert not (off / MANIFEST).exists()


def test_a_second_process_waits_for_the_build_then_reuses_it(model_dir, tmp_path):
    """The directory lock (flock, which also separates two opens in one process) serialises builds."""
    off = tmp_path / "off"
    off.mkdir()
    done = threading.Event()
    result = []

    def build():
        result.append(OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off,
                                                 progress=False))
        done.set()
    with dir_lock(off):  # as another process building
        t = threading.Thread(target=build)
        t.start()
        assert not done.wait(0.3)  # it waits for the lock
    t.join()
    stamp = (off / DATA_FILE).stat().st_mtime_ns
    OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    assert (off / DATA_FILE).stat().st_mtime_ns == stamp and result  # reused


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_build_and_reads_leave_no_page_cache(model_dir, tmp_path):
    units = [layer_unit(0), layer_unit(1)]
    store = OffloadStore.open_or_build(open_model(model_dir), units, torch.float32, tmp_path / "off", progress=False)
    data = tmp_path / "off" / DATA_FILE
    assert cached_pages(data) == 0
    buf = AlignedBuffer(store.max_unit_bytes())
    with store.open_reader() as reader:
        store.read_unit(reader, layer_unit(1), buf)
    assert cached_pages(data) == 0
    buf.close()
