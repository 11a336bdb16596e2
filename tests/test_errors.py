"""Bad input: one line naming the problem, exit code 2, no traceback unless --debug."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from helpers import assert_one_line_error, run_cli

from tierlm import cli
from tierlm.cli import main
from tierlm.errors import ModelFormatError, StorageError
from tierlm.kvcache import block_file
from tierlm.offload import disk_build as offload_build
from tierlm.weights import open_model
from tierlm.weights.embedded import embedded_model_path


def _tiny_gguf(path: Path, arch: str = "llama", qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    w = GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    data = np.zeros((8, 32), dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", data)
    else:  # raw bytes of an exotic type: 8 rows of one IQ2_XXS block (66 bytes for 256 values)
        w.add_tensor("token_embd.weight", np.zeros((8, 66), dtype=np.uint8), raw_shape=(8, 66), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert_one_line_error(code, err, "no such file")


@pytest.mark.parametrize("name", ["notes.txt", "model.gguf"])
def test_not_a_model_file(capsys, tmp_path, name):
    f = tmp_path / name
    f.write_text("hello, I am not a model\n")
    code, _, err = run_cli(capsys, "info", str(f))
    assert_one_line_error(code, err, "not a")


def test_truncated_gguf_data(capsys, tmp_path):
    src = embedded_model_path()
    f = tmp_path / "truncated.gguf"
    with src.open("rb") as a, f.open("wb") as b:
        b.write(a.read(src.stat().st_size // 2))
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--model", str(f))
    assert_one_line_error(code, err, "truncated")


def test_truncated_gguf_header(capsys, tmp_path):
    f = tmp_path / "header.gguf"
    with embedded_model_path().open("rb") as a:
        f.write_bytes(a.read(4096))
    code, _, err = run_cli(capsys, "info", str(f))
    assert_one_line_error(code, err, "truncated")


def test_unsupported_architecture_gguf(capsys, tmp_path):
    f = _tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    code, _, err = run_cli(capsys, "info", str(f))
    assert_one_line_error(code, err, "unsupported architecture", "gpt2")


def test_unsupported_architecture_hf(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert_one_line_error(code, err, "unsupported architecture", "bert")


def test_unsupported_quant_type(capsys, tmp_path):
    f = _tiny_gguf(tmp_path / "iq.gguf", qtype=GGMLQuantizationType.IQ2_XXS)
    code, _, err = run_cli(capsys, "info", str(f))
    assert_one_line_error(code, err, "unsupported GGUF tensor type", "IQ2_XXS")


def _with_u32(path: Path, key: str, delta: int) -> Path:
    """A copy of the embedded model with one uint32 metadata value changed by `delta` (patched in place)."""
    data = bytearray(embedded_model_path().read_bytes())
    at = data.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF value type uint32
    struct.pack_into("<I", data, at + 4, struct.unpack_from("<I", data, at + 4)[0] + delta)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("key, needles", [
    ("llama.feed_forward_length", ("blk.0.ffn_gate.weight + blk.0.ffn_up.weight", "(3072, 576)", "(3074, 576)")),
    ("llama.block_count", ("lacks", "blk.30.attn_norm.weight")),
])
def test_metadata_that_disagrees_with_the_tensors_names_the_tensor(capsys, tmp_path, key, needles):
    f = _with_u32(tmp_path / "edited.gguf", key, 1)
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--max-tokens", "1", "--model", str(f))
    assert_one_line_error(code, err, *needles)


def test_pickle_checkpoint_refused(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    code, _, err = run_cli(capsys, "info", str(tmp_path / "pytorch_model.bin"))
    assert_one_line_error(code, err, "pickle")


def test_hf_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(ModelFormatError, match="no \\*.safetensors"):
        open_model(tmp_path)


def test_prompt_longer_than_context(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "hello " * 9000, "--max-tokens", "4")
    assert_one_line_error(code, err, "context")


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "top_p"),
    (["generate", "--prompt", "x", "--top-k", "-3"], "top_k"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "max-tokens"),
    (["generate", "--prompt", "x", "--max-tokens", "many"], "max-tokens"),
    (["generate", "--prompt", "x", "--threads", "0"], "threads"),
    (["generate", "--prompt", "x", "--dtype", "float8"], "dtype"),
    (["generate"], "--prompt"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_cli_values(capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(ModelFormatError):
        main(["--debug", "info", str(tmp_path / "missing.gguf")])


def _tiny_model(tiny_models, capsys) -> str:
    path = str(tiny_models["llama3_rope"].path)
    capsys.readouterr()  # the fixture's progress output, when it builds the model now
    return path


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_the_offload_store(capsys, tiny_models, tmp_path, monkeypatch):
    """ENOSPC during the build: one line naming the directory, the need and the free space; exit 2; no store
    (no manifest, no temp file) a later run would trust."""
    def full(*args):
        args[-1](memoryview(b"x" * 4096))
        raise _enospc()
    monkeypatch.setattr(offload_build, "_encode_unit", full)
    off, model = tmp_path / "off", _tiny_model(tiny_models, capsys)
    code, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "x",
                           "--max-tokens", "2", "--max-context", "64", "--max-memory", "cpu=660KiB",
                           "--offload-dir", str(off))
    assert_one_line_error(code, err, f"cannot write the offload store in {off}", "No space left on device",
                          "needs", "free)")
    assert sorted(p.name for p in off.iterdir()) == [".lock"]


def test_too_little_free_space_for_the_offload_store(capsys, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(offload_build.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    code, _, err = run_cli(capsys, "generate", "--model", _tiny_model(tiny_models, capsys), "--prompt", "x",
                           "--max-tokens", "2", "--max-context", "64", "--max-memory", "cpu=660KiB",
                           "--offload-dir", str(tmp_path / "off"))
    assert_one_line_error(code, err, "not enough free space", "needs", "0 B free")


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_storage_oserror_anywhere_is_one_line(capsys, monkeypatch, code_):
    """An OSError of a full, forbidden or read-only disk that no layer turned into a StorageError is still the
    machine's state, not a bug: one line, exit 2."""
    def cmd(args):
        raise OSError(code_, os.strerror(code_), "/data/kv/abc.kvb")
    monkeypatch.setitem(cli.COMMANDS, "info", cmd)
    code, _, err = run_cli(capsys, "info")
    assert_one_line_error(code, err, "/data/kv/abc.kvb", os.strerror(code_))


@pytest.mark.parametrize("failure", [_enospc, lambda: RuntimeError("boom")])
def test_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch, failure):
    target = tmp_path / "block.kvb"
    target.write_bytes(b"old")

    def fsync(fd):
        raise failure()
    monkeypatch.setattr(block_file.os, "fsync", fsync)
    with pytest.raises(StorageError if failure is _enospc else RuntimeError) as e:
        block_file.atomic_write(target, b"new")
    if failure is _enospc:
        assert str(e.value) == f"cannot write {target}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.kvb"] and target.read_bytes() == b"old"
