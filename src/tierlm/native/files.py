"""Where the native library's sources and build live, and the fingerprint a built library must match (sources +
torch): read by the loader (native/__init__.py) and written by the build (native/build.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = sorted((HERE / "csrc").glob("*.cpp"))
HEADERS = sorted((HERE / "csrc").glob("*.h"))
OUT = HERE / "_built"
NAME = "tierlm_native"


def stamp(out: Path = OUT) -> Path:
    """Written last by a successful build into `out`: the fingerprint the library was built with."""
    return out / "stamp.txt"


def fingerprint() -> str:
    """What a built library must match to be loaded: the sources and the torch it was built against."""
    import torch
    h = hashlib.sha256(torch.__version__.encode())
    for f in SOURCES + HEADERS:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]
