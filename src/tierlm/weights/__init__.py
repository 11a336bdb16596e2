"""Open a model from a path (GGUF file or HF directory), or the embedded default when none is given."""
from __future__ import annotations

from pathlib import Path

from tierlm.errors import ModelFormatError, UnsupportedModelError
from tierlm.weights.embedded import embedded_model_path
from tierlm.weights.source import ModelSource

GGUF_MAGIC = b"GGUF"


def open_model(model: str | Path | None = None) -> ModelSource:
    from tierlm.weights.gguf import GGUFSource
    from tierlm.weights.safetensors import SafetensorsSource

    path = embedded_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        return SafetensorsSource(path)
    if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
        raise UnsupportedModelError(f"{path}: pickle checkpoints are not loaded (they can execute code); "
                                    "use safetensors or GGUF")
    if path.suffix == ".safetensors" or path.name == "config.json":
        return SafetensorsSource(path.parent)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{path}: not a model file (expected a GGUF file or a Hugging Face directory)")
    return GGUFSource(path)
