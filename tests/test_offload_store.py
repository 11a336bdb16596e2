"""The offload store: aligned per-layer layout, exact round trip, reuse, rebuild, corruption detection."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import cached_pages, flip

from tierlm.memory.directio import ALIGN, AlignedBuffer
from tierlm.memory.offload_store import DATA_FILE, MANIFEST, ChecksumError, OffloadStore
from tierlm.memory.units import EMBED, HEAD, layer_unit
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
    OffloadStore.open_or_build(open_model(model_dir), [layer_unit(1)], torch.float32, off, progress=False)
    assert list(json.loads((off / MANIFEST).read_text())["units"]) == ["layers.1"]  # other placement: rebuilt


def test_missing_manifest_means_rebuild(model_dir, tmp_path):
    off = tmp_path / "off"
    OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    (off / MANIFEST).unlink()  # as after a crash between the data rename and the manifest rename
    store = OffloadStore.open_or_build(open_model(model_dir), [layer_unit(0)], torch.float32, off, progress=False)
    assert (off / MANIFEST).is_file() and layer_unit(0) in store.units


def test_corruption_detected(model_dir, tmp_path):
    off = tmp_path / "off"
    units = [layer_unit(0), layer_unit(1), EMBED]
    store = OffloadStore.open_or_build(open_model(model_dir), units, torch.float32, off, progress=False)
    target = store.units["layers.1"].offset + store.units["layers.1"].tensors[1].offset + 7
    flip(off / DATA_FILE, target)
    embed = store.units[EMBED]
    row_bytes = embed.tensors[0].nbytes // embed.tensors[0].shape[0]
    flip(off / DATA_FILE, embed.offset + 9 * row_bytes + 3)
    buf, rows = AlignedBuffer(store.max_unit_bytes()), AlignedBuffer(store.row_buffer_bytes(EMBED))
    with store.open_reader() as reader:
        store.read_unit(reader, layer_unit(0), buf)  # untouched layer still verifies
        with pytest.raises(ChecksumError, match="layers.1"):
            store.read_unit(reader, layer_unit(1), buf)
        store.read_rows(reader, EMBED, [8, 10], rows)  # neighbouring rows are fine
        with pytest.raises(ChecksumError, match="row 9 of embed"):
            store.read_rows(reader, EMBED, [8, 9], rows)
    buf.close()
    rows.close()


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
