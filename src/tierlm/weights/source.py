"""`ModelSource`: what every loader returns. Tensors are read one at a time, by internal name, so later
tiers (host, disk) can be filled without materialising the whole model."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from tierlm.config import ModelConfig
from tierlm.errors import ModelFormatError
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import QuantBlocks
from tierlm.weights.names import check_complete
from tierlm.weights.tokenizer import Tokenizer


class ModelSource(ABC):
    path: Path
    format: str  # "gguf" | "safetensors"
    config: ModelConfig
    tokenizer: Tokenizer

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """Internal names present in the file (see weights/names.py)."""

    @abstractmethod
    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor by internal name, dequantised to `dtype`, [out, in] orientation."""

    def load_blocks(self, name: str, scheme: QuantScheme) -> QuantBlocks | None:
        """The tensor already quantised as `scheme` (unpacked), without loss, when the stored format allows
        (GGUF Q4_0/Q4_1/Q8_0); None otherwise."""
        return None

    @abstractmethod
    def storage_types(self) -> dict[str, int]:
        """How many tensors of each stored type ("Q4_1", "F32", "bfloat16", ...)."""

    def files(self) -> list[Path]:
        """The files the weights are read from (the GGUF file; the safetensors shards)."""
        return [self.path]

    def close(self) -> None:  # noqa: B027 — a no-op default: sources that hold no mapping need nothing
        """Release file mappings; load() must not be called afterwards. Config and tokenizer stay valid."""

    def validate(self) -> None:
        missing = check_complete(set(self.tensor_names()), self.config.num_layers, self.config.tie_word_embeddings)
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ModelFormatError(f"{self.path}: missing tensors {', '.join(missing[:3])}{more}")
