"""Hugging Face directory loader: config.json, *.safetensors (single or sharded index), tokenizer.json.

What each architecture's config.json keys and tensor names mean is the model's declaration (model/registry.py
finds it by model_type); this file reads the format. Pickle checkpoints (.bin/.pt) are never loaded: they can
execute code."""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tierlm.config import ModelConfig
from tierlm.errors import ModelFormatError, UnsupportedModelError
from tierlm.model import registry
from tierlm.model.family import read_config
from tierlm.weights.names import NameMap
from tierlm.weights.source import ModelSource
from tierlm.weights.tokenizer import tokenizer_from_hf_dir


class HFConfig:
    """config.json as a model's HF_CONFIG table reads it (model/family.py ConfigSource)."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def missing(self, key: str) -> Exception:
        return KeyError(key)  # reported as a bad or missing field of config.json


def config_from_hf(cfg: dict[str, Any], path: Path) -> ModelConfig:
    model_type = cfg.get("model_type")
    model = registry.for_hf(model_type)
    for key, why in model.HF_REFUSED.items():
        if cfg.get(key):
            raise UnsupportedModelError(why)
    try:
        fields = read_config(model.HF_CONFIG, HFConfig(cfg))
        return ModelConfig(arch=model.HF_MODEL_TYPES[model_type], name=path.name, **fields)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{path}/config.json: bad or missing field ({e})") from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {t: name for name, t in _ST_DTYPES.items()}


@dataclass(frozen=True)
class _Entry:
    file: Path
    key: str  # name in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


def _read_header(f: Path) -> dict[str, _Entry]:
    """Parse a safetensors header (u64 length + JSON); every entry checked against the file size."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise ModelFormatError(f"{f}: not a safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{f}: not a safetensors file (header is not JSON: {e})") from None
    out = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in e["data_offsets"])
            dtype, shape = e["dtype"], tuple(int(d) for d in e["shape"])
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{f}: malformed header entry for {key}") from None
        if dtype not in _ST_DTYPES:
            raise UnsupportedModelError(f"{f}: tensor {key} has dtype {dtype} (supported: {', '.join(_ST_DTYPES)})")
        t = _ST_DTYPES[dtype]
        nbytes = math.prod(shape) * t.itemsize
        if not 0 <= begin <= end or end - begin != nbytes or 8 + n + end > size:
            raise ModelFormatError(f"{f}: tensor {key} lies outside the file or has the wrong size (truncated?)")
        out[key] = _Entry(f, key, t, shape, 8 + n + begin, nbytes)
    return out


CONVERT_ELEMS = 1 << 21  # elements per piece when loading converts dtype (4 MiB of bf16)


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise OSError("unexpected end of file")
        got += n


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelFormatError(f"{index}: malformed index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = list(path.glob("*.bin")) + list(path.glob("*.pt"))
        if pickles:
            raise UnsupportedModelError(f"{path}: only pickle checkpoints ({pickles[0].name}); "
                                        "tierlm loads safetensors only (pickle can execute code)")
        raise ModelFormatError(f"{path}: no *.safetensors files")
    for f in files:
        if not f.is_file():
            raise ModelFormatError(f"{path}: shard {f.name} named in the index is missing")
    return files


class SafetensorsSource(ModelSource):
    format = "safetensors"

    def __init__(self, path: Path):
        self.path = path
        try:
            raw = json.loads((path / "config.json").read_text())
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: no config.json (not a Hugging Face model directory)") from None
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{path}/config.json: not valid JSON ({e})") from None
        self.config = config_from_hf(raw, path)
        self._where: dict[str, _Entry] = {}  # internal name -> where its bytes are
        self._dtypes: Counter[str] = Counter()
        self._files = _shard_files(path)
        model = registry.for_config(self.config)
        names = NameMap(model, "hf")
        # added at load (model/family.py TensorDecl.hf_shift): Gemma's norms, stored by HF as w for (1 + w)
        self._shift = {t.name: t.hf_shift for t in (*model.GLOBAL_TENSORS, *model.LAYER_TENSORS) if t.hf_shift}
        for f in self._files:
            try:
                entries = _read_header(f)
            except OSError as e:
                raise ModelFormatError(f"{f}: not a readable safetensors file ({e})") from None
            for key, e in entries.items():
                if (internal := names.internal(key)) is not None:
                    self._where[internal] = e
                    self._dtypes[_ST_NAMES[e.dtype]] += 1
        self.tokenizer = tokenizer_from_hf_dir(path)
        self.validate()

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def files(self) -> list[Path]:
        return list(self._files)

    def content_files(self) -> list[Path]:
        meta = [self.path / n for n in ("config.json", "generation_config.json", "tokenizer.json",
                                        "tokenizer_config.json", "special_tokens_map.json")]
        return [f for f in meta if f.is_file()] + self.files()

    def storage_types(self) -> dict[str, int]:
        return dict(self._dtypes)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].shape)

    def load(self, name: str, dtype: torch.dtype, rows: slice = slice(None),
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (or rows of it) into fresh memory with pread, then drop its file pages from the page
        cache. NOTE: not through a memory map: mapped pages count in RSS while mapped, so loading a 100 MiB
        tensor would briefly cost 200 MiB against the budget (and leave the weights in the page cache)."""
        e = self._where[name]
        shape = tuple(e.shape)
        first = 0
        if rows != slice(None):
            first, stop, _ = rows.indices(shape[0])
            shape = (max(0, stop - first), *shape[1:])
        begin = e.offset + first * math.prod(e.shape[1:]) * e.dtype.itemsize  # byte offset of the first row
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}")
        flat = out.view(-1)
        # Same dtype: read straight into the result. Otherwise read pieces of CONVERT_ELEMS elements into a
        # small scratch and convert each into place, so a conversion never holds a second full copy.
        step = flat.numel() if dtype == e.dtype else CONVERT_ELEMS
        scratch = flat if dtype == e.dtype else torch.empty(min(step, flat.numel()), dtype=e.dtype)
        try:
            fd = os.open(e.file, os.O_RDONLY)
            try:
                for start in range(0, flat.numel(), max(step, 1)):
                    n = min(step, flat.numel() - start)
                    part = scratch[:n] if scratch is not flat else flat
                    _pread_exact(fd, memoryview(part.view(torch.uint8).numpy()), begin + start * e.dtype.itemsize)
                    if part is not flat:
                        flat[start:start + n] = part
                os.posix_fadvise(fd, begin, flat.numel() * e.dtype.itemsize, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError as err:
            raise ModelFormatError(f"{e.file}: cannot read tensor {e.key} ({err})") from None
        if shift := self._shift.get(name.rsplit(".", 1)[-1]):
            out.copy_(out.float().add_(shift))  # in fp32, as HF's (1.0 + weight.float())
        return out
