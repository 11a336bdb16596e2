"""Direct I/O reads return the file's bytes and leave nothing in the page cache; calibrate saves a profile."""
from __future__ import annotations

import os
import shutil

import pytest
from helpers import cached_pages

from tierlm.cli import main
from tierlm.offload.calibrate import (
    PROFILE_VERSION,
    Profile,
    describe_profile,
    load_profile,
    save_profile,
)
from tierlm.memory.directio import (
    ALIGN,
    AlignedBuffer,
    DirectFile,
    align_up,
    drop_from_page_cache,
)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    payload = os.urandom(3 * 1024 * 1024 + 123)  # not a multiple of the alignment: exercises the tail
    path.write_bytes(payload)
    drop_from_page_cache(path)
    return path, payload


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
@pytest.mark.parametrize("direct", [True, False])
def test_reads_match_file_and_bypass_page_cache(data_file, direct):
    path, payload = data_file
    buf = AlignedBuffer(align_up(len(payload)))
    with DirectFile(path, direct=direct) as f:
        got = bytearray()
        chunk = 1 << 20
        for off in range(0, len(payload), chunk):
            n = f.read_into(buf.view, off, min(chunk, len(payload) - off))
            got += buf.view[:n]
    buf.close()
    assert bytes(got) == payload
    assert cached_pages(path) == 0  # O_DIRECT never fills it; the buffered fallback evicts what it read


def test_unaligned_direct_offset_is_refused(data_file):
    path, _ = data_file
    buf = AlignedBuffer(ALIGN * 2)
    with DirectFile(path) as f:
        if not f.direct:
            pytest.skip("filesystem refuses O_DIRECT")
        with pytest.raises(ValueError, match="aligned"):
            f.read_into(buf.view, 100, 10)
    buf.close()


@pytest.mark.slow
def test_calibrate_saves_and_reuses_profile(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    args = ["calibrate", "--dir", str(tmp_path), "--size", "16MiB", "--queue-depth", "2", "--profile", str(profile)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "saved" in first and "GB/s" in first
    p = load_profile(profile)
    assert p is not None and p.disk_read_gbps > 0 and p.ram_gbps > 0 and set(p.gemv_gbps) == {"float32", "bfloat16", "int8", "int4"}
    assert not list(tmp_path.glob(".tierlm-calibrate*"))  # scratch file removed
    assert main(args) == 0
    assert "saved earlier" in capsys.readouterr().out
    assert load_profile(profile) == p  # reused, not re-measured


def test_profile_version_mismatch_is_ignored(tmp_path):
    path = tmp_path / "p.json"
    save_profile(Profile(1.0, True, 2.0, {"float32": 3.0}, 1e-4), path)
    assert "1.00 GB/s" in describe_profile(load_profile(path))
    path.write_text(path.read_text().replace(f'"version": {PROFILE_VERSION}', '"version": 999'))
    assert load_profile(path) is None
    path.write_text("{not json")
    assert load_profile(path) is None


def test_calibrate_bad_dir(capsys, tmp_path):
    assert main(["calibrate", "--dir", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
