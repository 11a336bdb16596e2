"""One internal tensor naming, and the maps from each file format to it, read from the model's declaration
(model/family.py TensorDecl; the Llama family's in model/llama.py).

Internal names (shapes are [out, in] like torch.nn.Linear): a global tensor by its name (embed, norm, lm_head,
rope_freqs for the Llama family), a layer's as layers.{i}.{name} (attn_norm, wq, ...).
A layer's tensors are under blk.{i}. in GGUF files and model.layers.{i}. in HF ones.
"""
from __future__ import annotations

import re
from typing import Literal

from tierlm.config import ModelConfig
from tierlm.model.family import ModelModule, TensorDecl, layer_name

__all__ = ["FORMATS", "NameMap", "check_complete", "file_name", "file_tensors", "layer_name"]

Format = Literal["gguf", "hf"]
FORMATS: tuple[Format, ...] = ("gguf", "hf")
_LAYER_PREFIX = {"gguf": "blk.{}.", "hf": "model.layers.{}."}
_LAYER_RE = {"gguf": re.compile(r"^blk\.(\d+)\.(.+)$"), "hf": re.compile(r"^model\.layers\.(\d+)\.(.+)$")}


def file_name(fmt: Format, t: TensorDecl, layer: int | None = None) -> str | None:
    """A tensor's name in a file of format `fmt` (layer: which layer's, for a layer tensor); None when that format
    never holds it."""
    name: str | None = getattr(t, fmt)
    if name is None or layer is None:
        return name
    return _LAYER_PREFIX[fmt].format(layer) + name


class NameMap:
    """File tensor names -> internal names, for one model and format."""

    def __init__(self, model: ModelModule, fmt: Format):
        self._globals = {n: t.name for t in model.GLOBAL_TENSORS if (n := getattr(t, fmt)) is not None}
        self._layer = {n: t.name for t in model.LAYER_TENSORS if (n := getattr(t, fmt)) is not None}
        self._re = _LAYER_RE[fmt]
        self._fmt = fmt

    def external(self, internal: str) -> str:
        """The file's name for an internal one (what an error shows a user: blk.0.ffn_gate.weight, not
        layers.0.w_gate); the internal name when this format has none for it."""
        layer, _, tensor = internal.removeprefix("layers.").partition(".") if internal.startswith("layers.") \
            else (None, "", internal)
        names = self._layer if layer is not None else self._globals
        file = next((f for f, i in names.items() if i == tensor), None)
        if file is None:
            return internal
        return file if layer is None else _LAYER_PREFIX[self._fmt].format(layer) + file

    def internal(self, name: str) -> str | None:
        """None for tensors tierlm does not use (e.g. rotary inv_freq buffers)."""
        if name in self._globals:
            return self._globals[name]
        m = self._re.match(name)
        if m and m.group(2) in self._layer:
            return layer_name(m.group(1), self._layer[m.group(2)])
        return None


def check_complete(model: ModelModule, cfg: ModelConfig, names: set[str]) -> list[str]:
    """Internal names a runnable model needs but the file lacks (empty when complete)."""
    need = lambda t: not t.optional and t.present(cfg)  # noqa: E731
    want = [t.name for t in model.GLOBAL_TENSORS if need(t)]
    want += [layer_name(i, t.name) for i in range(cfg.num_layers) for t in model.LAYER_TENSORS if need(t)]
    return [n for n in want if n not in names]


def file_tensors(model: ModelModule, cfg: ModelConfig, fmt: Format) -> list[tuple[int | None, TensorDecl]]:
    """(layer or None for a global, declaration) of every tensor a `fmt` file of this config holds (file_name
    names it), in the converters' order: the global tensors, each layer's, then the globals that follow the layers.
    For writers (tierlm synth, the tests' GGUF converter)."""
    def held(decls: tuple[TensorDecl, ...], layer: int | None = None) -> list[tuple[int | None, TensorDecl]]:
        return [(layer, t) for t in decls if t.present(cfg) and getattr(t, fmt) is not None]

    out = held(tuple(t for t in model.GLOBAL_TENSORS if not t.after_layers))
    for i in range(cfg.num_layers):
        out += held(model.LAYER_TENSORS, i)
    return out + held(tuple(t for t in model.GLOBAL_TENSORS if t.after_layers))
