"""The native kernels (csrc/, built by `python -m tierlm.native.build` at install): integer-dot int4/int8
matmuls and a decoder layer in one call. Opt-in for now (TIERLM_NATIVE=1): single-stream decode is 1.5x
torch's W4A16 path on the embedded model, but their M > 1 GEMM is still slower than torch's (prefill, batched
decode); see the README. When not enabled, not built (no compiler) or stale (other sources or torch), tierlm
runs on torch's kernels — `status()` says which and why. `lib()` loads a built library either way (tests).
"""
from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
from types import ModuleType


def enabled() -> bool:
    """TIERLM_NATIVE=1, read once per load (available() sits under every matmul's dispatch)."""
    return _load()[2]


@functools.cache
def _load() -> tuple[ModuleType | None, str, bool]:
    """(the library or None, why not, whether enabled); tests clear the cache to switch."""
    mod, why = _import()
    return mod, why, os.environ.get("TIERLM_NATIVE", "0") == "1"


def _import() -> tuple[ModuleType | None, str]:
    from tierlm.native.build import NAME, OUT, fingerprint, stamp  # not at import: `python -m ...build` runs it
    libs = sorted(OUT.glob(f"{NAME}*.so"))
    if not libs or not stamp().exists():
        return None, "off (not built: make install, or python -m tierlm.native.build)"
    if stamp().read_text().strip() != fingerprint():
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
    """The loaded extension (built and current), or None."""
    return _load()[0]


def available() -> bool:
    """Whether tierlm runs on the native kernels: built, current, and enabled."""
    mod, _, on = _load()
    return on and mod is not None


def status() -> str:
    """The int-dot path in use ("avx512-vnni", "avx2", "scalar"), or "off (why)"."""
    mod, why, on = _load()
    if mod is not None and not on:
        return f"off (built, {mod.isa()}; TIERLM_NATIVE=1 enables)"
    return mod.isa() if mod is not None else why
