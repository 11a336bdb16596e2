"""GGUF loader: metadata -> ModelConfig, tokenizer from metadata, tensors dequantised with gguf-py.

What each architecture's metadata keys and tensor names mean is the model's declaration (model/registry.py finds
it by general.architecture); this file reads GGUF."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from tierlm.config import ModelConfig
from tierlm.errors import ModelFormatError, UnsupportedModelError
from tierlm.model import registry
from tierlm.model.family import ModelModule, read_config
from tierlm.quant import ggml, int4
from tierlm.quant.scheme import INT4_BLOCK_N, QuantScheme
from tierlm.quant.tensor import QuantBlocks, QuantTensor
from tierlm.weights.gguf_file import GGUFFile
from tierlm.weights.names import NameMap
from tierlm.weights.source import ModelSource
from tierlm.weights.tokenizer import tokenizer_from_gguf

Q = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16}) | ggml.KERNEL_TYPES  # floats, and every block type the kernels read


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute on rows of a q/k weight [out, in] or bias [out]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFConfig:
    """What a model's GGUF_CONFIG table reads (model/family.py ConfigSource): the metadata under "{arch}.", and the
    tensors present (the vocabulary, a tied head and biases are known from them)."""

    def __init__(self, meta: dict[str, Any], arch: str, shapes: dict[str, tuple[int, ...]]):
        self.meta, self.arch, self.shapes = meta, arch, shapes

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def missing(self, key: str) -> Exception:
        return ModelFormatError(f"GGUF metadata lacks {self.arch}.{key}")

    def has_tensor(self, name: str) -> bool:
        return name in self.shapes

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]


def config_from_gguf(model: ModelModule, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """ModelConfig from the metadata and the (internal) names and shapes of the tensors present."""
    arch = meta["general.architecture"]
    fields = read_config(model.GGUF_CONFIG, GGUFConfig(meta, arch, shapes))
    return ModelConfig(arch=model.GGUF_ARCHS[arch], name=str(meta.get("general.name", "")), **fields)


class GGUFSource(ModelSource):
    format = "gguf"

    def __init__(self, path: Path):
        self.path = path
        self._file = GGUFFile(path)
        self.meta = self._file.metadata
        self.arch = self.meta.get("general.architecture")
        self.model = registry.for_gguf(self.arch)
        names = NameMap(self.model, "gguf")
        self._tensors = {internal: t for t in self._file.tensors.values()
                         if (internal := names.internal(t.name)) is not None}
        self._permuted = {t.name for t in self.model.LAYER_TENSORS if t.gguf_permuted} \
            if self.arch in self.model.PERMUTED_QK_ARCHS else set()
        if "embed" not in self._tensors:
            raise ModelFormatError(f"{path}: no token_embd.weight tensor")
        unsupported = {t.qtype.name for t in self._tensors.values() if t.qtype not in SUPPORTED_TYPES}
        if unsupported:
            raise UnsupportedModelError(f"{path}: unsupported GGUF tensor type(s) {', '.join(sorted(unsupported))}")
        self.config = config_from_gguf(self.model, self.meta, {n: t.shape for n, t in self._tensors.items()})
        self.tokenizer = tokenizer_from_gguf(self.meta)
        self.validate()

    def close(self) -> None:
        self._file.close()

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def storage_type(self, name: str) -> str | None:
        t = self._tensors.get(name)
        return None if t is None else t.qtype.name

    def storage_types(self) -> dict[str, int]:
        return dict(Counter(t.qtype.name for t in self._tensors.values()))

    def _unpermute_rows(self, name: str, w: np.ndarray) -> np.ndarray:
        """q/k rows back to HF order. Works on any piece of whole heads (see piece_rows)."""
        if name.rsplit(".", 1)[-1] in self._permuted:
            return _unpermute(w, w.shape[0] // self.config.head_dim)
        return w

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def load(self, name: str, dtype: torch.dtype, rows: slice = slice(None),
             out: torch.Tensor | None = None) -> torch.Tensor:
        t = self._tensors[name]
        try:
            raw = self._file.raw(t, rows)
            w = dequantize(raw, t.qtype).astype(np.float32, copy=False)
        except (ValueError, OSError) as e:
            raise ModelFormatError(f"{self.path}: cannot read tensor {t.name} ({e})") from None
        del raw
        w = self._unpermute_rows(name, w)
        if out is not None:
            return out.copy_(torch.from_numpy(w))
        if not w.flags.writeable or not w.flags.c_contiguous:
            w = np.array(w, dtype=np.float32, order="C")
        return torch.from_numpy(w).to(dtype)

    def _blocks(self, name: str, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rows of a Q4_0/Q4_1/Q8_0 tensor in HF row order: (blocks uint8 [R, K/32, bytes per block], d fp16
        [R, K/32], m fp16 [R, K/32] or None for Q8_0), with w = d*q + m; Q4_0's implicit min is -8d (exact)."""
        t = self._tensors[name]
        raw = self._unpermute_rows(name, self._file.raw(t, rows))  # whole rows: the permutation commutes
        block = raw.reshape(raw.shape[0], t.shape[1] // 32, -1)
        d = block[..., 0:2].copy().view(np.float16)[..., 0]
        if t.qtype == Q.Q4_1:
            m = block[..., 2:4].copy().view(np.float16)[..., 0]
        else:
            m = (-8 * d.astype(np.float32)).astype(np.float16) if t.qtype == Q.Q4_0 else None
        return block, d, m

    def ggml_tensors(self) -> tuple[tuple[str, int, int], ...]:
        return tuple((n, int(t.qtype), t.shape[0]) for n, t in self._tensors.items()
                     if len(t.shape) == 2 and ggml.takes(int(t.qtype), t.shape[1]))

    def load_ggml(self, names: list[str]) -> QuantTensor:
        """The stored blocks read once into the output (q/k rows un-permuted: a permutation of whole rows
        within each head moves whole block rows), no conversion."""
        infos = [self._tensors[n] for n in names]
        k = infos[0].shape[1]
        runs = ggml.merge((int(t.qtype), t.shape[0]) for t in infos)
        out = torch.empty(ggml.nbytes(runs, k), dtype=torch.uint8)
        at = 0
        for name, t in zip(names, infos):
            try:
                raw = self._unpermute_rows(name, self._file.raw(t, slice(0, t.shape[0])))  # [R, row bytes]
            except (ValueError, OSError) as e:
                raise ModelFormatError(f"{self.path}: cannot read tensor {t.name} ({e})") from None
            out[at:at + raw.size].copy_(torch.from_numpy(np.ascontiguousarray(raw).reshape(-1)))
            at += raw.size
        return QuantTensor("ggml", (sum(t.shape[0] for t in infos), k), k, out, None, runs=runs)

    def load_packed(self, name: str, scheme: QuantScheme, rows: slice = slice(None)) -> QuantTensor | None:
        """Q4_0/Q4_1 rows (a multiple of 64 of them) packed straight into the int4 layout, without loss
        (int4.pack_gguf_nibbles); None where load_blocks is the way."""
        t = self._tensors[name]
        if t.qtype not in (Q.Q4_0, Q.Q4_1) or scheme != QuantScheme("int4", 32) or len(t.shape) != 2:
            return None
        if len(range(*rows.indices(t.shape[0]))) % INT4_BLOCK_N:
            return None
        block, d, m = self._blocks(name, rows)
        qs = torch.from_numpy(np.ascontiguousarray(block[..., -16:]))  # [R, K/32, 16]
        packed = int4.pack_gguf_nibbles(qs)
        return QuantTensor("int4", (block.shape[0], t.shape[1]), 32, packed, torch.from_numpy(d), torch.from_numpy(m))

    def load_blocks(self, name: str, scheme: QuantScheme, rows: slice = slice(None)) -> QuantBlocks | None:
        """Q4_0/Q4_1 blocks as int4 g=32 and Q8_0 blocks as int8 g=32, unpacked but bit for bit (see quant/);
        None when the stored type does not map onto `scheme` without loss."""
        t = self._tensors[name]
        kind = {Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q8_0: "int8"}.get(t.qtype)
        if kind is None or scheme != QuantScheme(kind, 32) or len(t.shape) != 2:
            return None
        block, d, m = self._blocks(name, rows)
        n, k = block.shape[0], t.shape[1]
        if kind == "int8":
            q = block[..., 2:34].copy().view(np.int8).reshape(n, k)
        else:  # [R, K/32, 16] bytes: element j in the low nibble of byte j, element j+16 in the high one
            qs = block[..., -16:]
            q = np.concatenate((qs & 15, qs >> 4), axis=-1).reshape(n, k)
        as_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return QuantBlocks(kind, 32, as_t(d), as_t(m), as_t(q))
