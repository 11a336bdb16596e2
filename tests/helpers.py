"""Helpers shared by test modules (plain functions, imported explicitly)."""
from __future__ import annotations

import subprocess

from tierlm.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def cached_pages(path) -> int:
    """Resident pages of `path` per util-linux fincore."""
    out = subprocess.run(["fincore", "--raw", "--noheadings", "--output", "PAGES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def flip(path, offset: int) -> None:
    """Corrupt one byte of `path` in place (bit-flip), as a failing disk would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A user error: exit code 2 and exactly one line on stderr naming each of `needles`."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tierlm: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
