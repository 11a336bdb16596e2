"""The offload store: aligned per-layer layout, exact round trip, reuse, rebuild, corruption detection."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import cached_pages

from tierlm.memory.directio import ALIGN, AlignedBuffer
from tierlm.memory.offload_store import DATA_FILE, MANIFEST, ChecksumError, OffloadStore
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
    store = OffloadStore.open_or_build(source, layers, dtype, tmp_path / "off", progress=False)
    buf = AlignedBuffer(store.max_layer_bytes)
    with store.open_reader() as reader:
        for i in layers:
            s = store.layers[i]
            assert s.offset % ALIGN == 0 and s.nbytes % ALIGN == 0
            assert all(t.offset % ALIGN == 0 for t in s.tensors)
            got = store.read_layer(reader, i, buf, verify=True)
            assert set(got) == {"attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "ffn_norm", "w_gate",
                                "w_up", "w_down"}
            for leaf, t in got.items():
                assert torch.equal(t, source.load(layer_name(i, leaf), dtype))
    del got, t  # views into buf: the buffer cannot be closed while they live
    buf.close()


def test_reused_when_unchanged_rebuilt_when_source_changes(model_dir, tmp_path):
    off = tmp_path / "off"
    OffloadStore.open_or_build(open_model(model_dir), [0, 1], torch.float32, off, progress=False)
    stamp = (off / DATA_FILE).stat().st_mtime_ns
    OffloadStore.open_or_build(open_model(model_dir), [0, 1], torch.float32, off, progress=False)
    assert (off / DATA_FILE).stat().st_mtime_ns == stamp  # reused, not rewritten
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new file: the fingerprint changes
    OffloadStore.open_or_build(open_model(model_dir), [0, 1], torch.float32, off, progress=False)
    assert (off / DATA_FILE).stat().st_mtime_ns != stamp
    OffloadStore.open_or_build(open_model(model_dir), [1], torch.float32, off, progress=False)
    assert list(json.loads((off / MANIFEST).read_text())["layers"]) == ["1"]  # other placement: rebuilt


def test_missing_manifest_means_rebuild(model_dir, tmp_path):
    off = tmp_path / "off"
    OffloadStore.open_or_build(open_model(model_dir), [0], torch.float32, off, progress=False)
    (off / MANIFEST).unlink()  # as after a crash between the data rename and the manifest rename
    store = OffloadStore.open_or_build(open_model(model_dir), [0], torch.float32, off, progress=False)
    assert (off / MANIFEST).is_file() and 0 in store.layers


def test_corruption_detected(model_dir, tmp_path):
    off = tmp_path / "off"
    store = OffloadStore.open_or_build(open_model(model_dir), [0, 1], torch.float32, off, progress=False)
    target = store.layers[1].offset + store.layers[1].tensors[1].offset + 7
    with (off / DATA_FILE).open("r+b") as f:
        f.seek(target)
        byte = f.read(1)
        f.seek(target)
        f.write(bytes([byte[0] ^ 0xFF]))
    buf = AlignedBuffer(store.max_layer_bytes)
    with store.open_reader() as reader:
        store.read_layer(reader, 0, buf, verify=True)  # untouched layer still verifies
        with pytest.raises(ChecksumError, match="layer 1"):
            store.read_layer(reader, 1, buf, verify=True)
    buf.close()


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_build_and_reads_leave_no_page_cache(model_dir, tmp_path):
    store = OffloadStore.open_or_build(open_model(model_dir), [0, 1], torch.float32, tmp_path / "off", progress=False)
    data = tmp_path / "off" / DATA_FILE
    assert cached_pages(data) == 0
    buf = AlignedBuffer(store.max_layer_bytes)
    with store.open_reader() as reader:
        store.read_layer(reader, 1, buf)
    assert cached_pages(data) == 0
    buf.close()
