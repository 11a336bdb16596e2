"""Builds the native kernels (csrc/) into _built/ with torch's cpp_extension and ninja, for this machine's CPU
(-march=native: the Makefile builds at install, on the machine that runs them; the int-dot paths are chosen
at run time from what the CPU has). `python -m tierlm.native.build` is the Makefile's step; a failure (no
compiler, no ninja) prints one line and tierlm runs on torch's kernels.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = sorted((HERE / "csrc").glob("*.cpp"))
HEADERS = sorted((HERE / "csrc").glob("*.h"))
OUT = HERE / "_built"
NAME = "tierlm_native"


def stamp() -> Path:
    """Written last by a successful build: the fingerprint the library was built with."""
    return OUT / "stamp.txt"


def fingerprint() -> str:
    """What a built library must match to be loaded: the sources and the torch it was built against."""
    import torch
    h = hashlib.sha256(torch.__version__.encode())
    for f in SOURCES + HEADERS:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def build(verbose: bool = False) -> Path:
    """Compile (ninja rebuilds only what changed) and record the fingerprint; returns the library's path."""
    from torch.utils.cpp_extension import load
    OUT.mkdir(exist_ok=True)
    stamp().unlink(missing_ok=True)
    load(name=NAME, sources=[str(s) for s in SOURCES], build_directory=str(OUT), verbose=verbose,
         extra_cflags=["-O3", "-march=native", "-fno-math-errno"], extra_include_paths=[str(HERE / "csrc")])
    lib = next(OUT.glob(f"{NAME}*.so"))
    stamp().write_text(fingerprint())
    return lib


def main() -> int:
    t0 = time.perf_counter()
    if shutil.which("c++") is None and shutil.which("g++") is None:
        print("tierlm: no C++ compiler found: native kernels not built, torch's kernels will be used", file=sys.stderr)
        return 0
    try:
        lib = build(verbose="-v" in sys.argv)
    except Exception as e:  # noqa: BLE001 - any build failure degrades to torch's kernels, in one line
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"tierlm: native kernels not built ({msg}); torch's kernels will be used", file=sys.stderr)
        return 0
    from tierlm import native
    print(f"tierlm: native kernels built in {time.perf_counter() - t0:.0f} s ({lib.name}, {native.status()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
