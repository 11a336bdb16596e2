"""`ModelSource`: what every loader returns. Tensors are read one at a time, by internal name, so later
tiers (host, disk) can be filled without materialising the whole model."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from tierlm.config import ModelConfig
from tierlm.errors import ModelFormatError
from tierlm.model import registry
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import QuantBlocks, QuantTensor
from tierlm.weights.names import NameMap, check_complete
from tierlm.weights.tokenizer import Tokenizer


PIECE_BYTES = 8 << 20  # fp32 bytes of one row piece while loading: bounds the transient (unit_load.py)


class ModelSource(ABC):
    path: Path
    format: str  # "gguf" | "safetensors"
    config: ModelConfig
    tokenizer: Tokenizer

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """Internal names present in the file (see weights/names.py)."""

    @abstractmethod
    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """[out, in] shape of a tensor by internal name."""

    @abstractmethod
    def load(self, name: str, dtype: torch.dtype, rows: slice = slice(None),
             out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor (or a slice of its rows) by internal name, dequantised to `dtype`, [out, in] orientation,
        in fresh memory the caller owns, or written into `out` (a contiguous tensor of that shape and dtype:
        a source that can read straight into it holds no second copy)."""

    def load_blocks(self, name: str, scheme: QuantScheme, rows: slice = slice(None)) -> QuantBlocks | None:
        """The tensor (or a slice of its rows) already quantised as `scheme` (unpacked), without loss, when the
        stored format allows (GGUF Q4_0/Q4_1/Q8_0); None otherwise."""
        return None

    def ggml_tensors(self) -> tuple[tuple[str, int, int], ...]:
        """(internal name, ggml type id, rows) of every matrix stored in GGUF blocks the native kernels read
        as they are (quant/ggml.py); () for other formats."""
        return ()

    def load_ggml(self, names: list[str]) -> QuantTensor:
        """The matrices `names` (rows concatenated) as one "ggml" QuantTensor: their stored bytes, rows in HF
        order. Only for names ggml_tensors() lists."""
        raise NotImplementedError(f"{type(self).__name__} holds no GGUF blocks")

    def load_packed(self, name: str, scheme: QuantScheme, rows: slice = slice(None)) -> QuantTensor | None:
        """The rows already packed as `scheme` (loaded form), without loss, where the stored format allows a
        direct repack (GGUF Q4_0/Q4_1 -> int4 g=32); None otherwise (load_blocks, then pack)."""
        return None

    def piece_rows(self, name: str, target_bytes: int = PIECE_BYTES) -> int:
        """Rows per piece when loading `name` a piece at a time: about `target_bytes` of fp32, in whole 64-row
        blocks (the int4 layout) and whole heads (GGUF q/k rows are un-permuted per head)."""
        unit = math.lcm(64, self.config.head_dim)
        rows = target_bytes // (4 * self.tensor_shape(name)[-1]) // unit * unit
        return max(unit, rows)

    @abstractmethod
    def storage_types(self) -> dict[str, int]:
        """How many tensors of each stored type ("Q4_1", "F32", "bfloat16", ...)."""

    def storage_type(self, name: str) -> str | None:
        """The stored type of one tensor ("Q4_1", "bfloat16", ...), None when absent."""
        return None

    def head_storage_type(self) -> str | None:
        """The stored type of the lm_head matrix (the embedding when tied)."""
        return self.storage_type("embed" if self.config.tie_word_embeddings else "lm_head")

    def files(self) -> list[Path]:
        """The files the weights are read from (the GGUF file; the safetensors shards)."""
        return [self.path]

    def content_files(self) -> list[Path]:
        """Every file the model's behaviour depends on (weights, config, tokenizer): its content fingerprint."""
        return self.files()

    def close(self) -> None:  # noqa: B027 — a no-op default: sources that hold no mapping need nothing
        """Release file mappings; load() must not be called afterwards. Config and tokenizer stay valid."""

    def file_name(self, name: str) -> str:
        """The file's own name of an internal tensor name (for errors)."""
        return NameMap(registry.for_config(self.config), "gguf" if self.format == "gguf" else "hf").external(name)

    def validate(self) -> None:
        missing = check_complete(registry.for_config(self.config), self.config, set(self.tensor_names()))
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            names = ", ".join(self.file_name(n) for n in missing[:3])
            raise ModelFormatError(f"{self.path}: the metadata implies tensors the file lacks: {names}{more}")
