"""Builds the native kernels (csrc/) into _built/ with torch's cpp_extension and ninja, for this machine's CPU
(-march=native: the Makefile builds at install, on the machine that runs them; the int-dot paths are chosen
at run time from what the CPU has). `python -m tierlm.native.build` is the Makefile's step; a failure (no
compiler, no ninja) prints one line and tierlm runs on torch's kernels.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from tierlm import native
from tierlm.native.files import HERE, NAME, OUT, SOURCES, fingerprint, stamp


def build(verbose: bool = False) -> Path:
    """Compile (ninja rebuilds only what changed) and record the fingerprint; returns the library's path."""
    from torch.utils.cpp_extension import load
    OUT.mkdir(exist_ok=True)
    stamp(OUT).unlink(missing_ok=True)  # OUT, not files.OUT: tests build elsewhere
    # -fopenmp: at::parallel_for is a header template whose threads are an `omp parallel` pragma compiled into the
    # caller; without it every native kernel ran on one thread (measured: the Qwen2.5-0.5B head, Q8_0, 17.2 ms on
    # one thread, 8.6 ms on two). The library then shares torch's libgomp (same soname, loaded first).
    load(name=NAME, sources=[str(s) for s in SOURCES], build_directory=str(OUT), verbose=verbose,
         extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"], extra_ldflags=["-fopenmp"],
         extra_include_paths=[str(HERE / "csrc")])
    lib = next(OUT.glob(f"{NAME}*.so"))
    stamp(OUT).write_text(fingerprint())
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
    print(f"tierlm: native kernels built in {time.perf_counter() - t0:.0f} s ({lib.name}, {native.status()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
