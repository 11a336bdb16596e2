"""The native kernels (csrc/, built by `python -m tierlm.native.build` at install): integer-dot int4/int8
matmuls and a decoder layer in one call. Optional: when they are not built (no compiler), stale (other sources
or torch), or disabled (TIERLM_NATIVE=0), tierlm runs on torch's kernels — `status()` says which and why.
"""
from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
from types import ModuleType


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    from tierlm.native.build import NAME, OUT, STAMP, fingerprint  # not at import: `python -m ...build` runs it
    if os.environ.get("TIERLM_NATIVE", "1") == "0":
        return None, "off (TIERLM_NATIVE=0)"
    libs = sorted(OUT.glob(f"{NAME}*.so"))
    if not libs or not STAMP.exists():
        return None, "off (not built: make install, or python -m tierlm.native.build)"
    if STAMP.read_text().strip() != fingerprint():
        return None, "off (built from other sources or another torch: rebuild with python -m tierlm.native.build)"
    import torch  # noqa: F401 - the library links against torch's, which must be loaded first
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(libs[0]))
    spec = importlib.util.spec_from_file_location(NAME, str(libs[0]), loader=loader)
    try:
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
    except ImportError as e:
        return None, f"off (cannot load {libs[0].name}: {e})"
    return mod, mod.isa()


def lib() -> ModuleType | None:
    """The loaded extension, or None."""
    return _load()[0]


def available() -> bool:
    return lib() is not None


def status() -> str:
    """The int-dot path in use ("avx512-vnni", "avx2", "scalar"), or "off (why)"."""
    mod, why = _load()
    return mod.isa() if mod is not None else why
