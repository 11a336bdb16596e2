"""The native library (csrc/, built by `python -m tierlm.native.build` at install): a decoder layer in one call
and integer-dot int4/int8 matmuls. TIERLM_NATIVE selects: unset, the layer step with torch's fused W4A16/W8A16
matmuls inside it (the default); 1, the integer-dot kernels too (opt-in: their M > 1 GEMM is still slower than
torch's; see the README); 0, neither (the Python layer). When the library is not built (no compiler) or stale
(other sources or torch), tierlm runs the Python layer on torch's kernels — `status()` says which and why.
`lib()` loads a built library whatever the setting (tests).
"""
from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
from types import ModuleType

from tierlm.native.files import NAME, OUT, fingerprint, stamp


@functools.cache
def _load() -> tuple[ModuleType | None, str, str]:
    """(the library or None, why not, TIERLM_NATIVE) read once (available() sits under every matmul's
    dispatch); tests clear the cache to switch."""
    mod, why = _import()
    return mod, why, os.environ.get("TIERLM_NATIVE", "")


def _import() -> tuple[ModuleType | None, str]:
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
    """Whether the integer-dot kernels run (int4 matrices then take GGUF's layout): built, current, TIERLM_NATIVE=1."""
    mod, _, env = _load()
    return env == "1" and mod is not None


def layer_step_available() -> bool:
    """Whether quantised layers run as one native call each (unless TIERLM_NATIVE=0)."""
    mod, _, env = _load()
    return env != "0" and mod is not None


def status() -> str:
    """What runs: "int-dot avx512-vnni" (or avx2, scalar), "layer step, torch matmuls", or "off (why)"."""
    mod, why, env = _load()
    if mod is None:
        return why
    if env == "0":
        return "off (TIERLM_NATIVE=0)"
    return f"int-dot {mod.isa()}" if env == "1" else f"layer step, torch matmuls (int-dot {mod.isa()}: TIERLM_NATIVE=1)"
