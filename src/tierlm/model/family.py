"""What a model file declares besides its forward, as data the rest of tierlm reads (through model/registry.py):

  configuration  {ModelConfig field: reader} tables, one per file format (GGUF metadata, HF config.json)
  tensors        TensorDecl: one tensor of a layer (or of the model) with its name in each format and its shape
  layer fields   FieldDecl: one LayerWeights field as stored and computed with, its tensors' rows concatenated

Loaders, writers, the offload units and the weight store all work from these, so an architecture is one file.
Internal names: a global tensor by its name ("embed"), a layer tensor as layers.{i}.{name} (layer_name).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tierlm.config import ModelConfig
from tierlm.quant.tensor import QuantTensor

Matrix = torch.Tensor | QuantTensor  # dense, or weight-only int8/int4 (quant/); kernels.linear takes both


def layer_name(layer: int | str, tensor: str) -> str:
    return f"layers.{layer}.{tensor}"


# --- configuration ---------------------------------------------------------------------------------------------
class ConfigSource(Protocol):
    """A file's configuration as a config table reads it (the loaders implement one per format)."""

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under `key` (GGUF: under "{arch}."), or `default` when absent."""

    def missing(self, key: str) -> Exception:
        """The error for a required key the file lacks (each format words its own)."""


REQUIRED = object()  # ConfigKey default: the key must be there
_ABSENT = object()


@dataclass(frozen=True)
class ConfigKey:
    """A ModelConfig field read from one key: converted, or its default when the key is absent. A callable default
    is computed from the fields read before this one, and also replaces a null or zero value (as HF's
    `config.get(key) or ...`). convert None: the value as stored."""

    key: str
    convert: Callable[[Any], Any] | None = int
    default: Any = REQUIRED

    def __call__(self, src: ConfigSource, fields: dict[str, Any]) -> Any:
        value = src.get(self.key, _ABSENT)
        if callable(self.default):
            value = value if value is not _ABSENT and value else self.default(fields)
        elif value is _ABSENT:
            if self.default is REQUIRED:
                raise src.missing(self.key)
            value = self.default
        return value if self.convert is None else self.convert(value)


# A table entry: a ConfigKey, or any reader of (the file's configuration, the fields read so far).
ConfigTable = Mapping[str, Callable[[Any, dict[str, Any]], Any]]


def read_config(table: ConfigTable, src: Any, **given: Any) -> dict[str, Any]:
    """ModelConfig fields from `src`, in the table's order (a reader may use the fields before it)."""
    fields = dict(given)
    for name, read in table.items():
        fields[name] = read(src, fields)
    return fields


# --- tensors ---------------------------------------------------------------------------------------------------
def always(cfg: ModelConfig) -> bool:
    return True


@dataclass(frozen=True)
class TensorDecl:
    """One tensor as the files hold it. A layer tensor's file names are under blk.{i}. (GGUF) and
    model.layers.{i}. (HF); None: that format never holds it."""

    name: str  # internal: "wq" (layers.{i}.wq), "embed"
    gguf: str | None  # "attn_q.weight"
    hf: str | None  # "self_attn.q_proj.weight"
    shape: Callable[[ModelConfig], tuple[int, ...]]  # [out, in] like torch.nn.Linear
    matrix: bool = False  # a 2-D weight: quantisable (a GGUF stores it in the file's type; norms and biases in F32)
    optional: bool = False  # a complete file may lack it (biases; the llama3 rope factors)
    present: Callable[[ModelConfig], bool] = always  # whether a file of this config has it (what a writer writes)
    gguf_permuted: bool = False  # rows permuted by llama.cpp's converter under the family's PERMUTED_QK_ARCHS
    after_layers: bool = False  # a global tensor the converters write after the layers (file order)
    # added to the HF values at load (in fp32): Gemma's norms multiply by (1 + w), which llama.cpp's converter
    # stores as such; the forward multiplies by what is stored, whatever the format
    hf_shift: float = 0.0


@dataclass(frozen=True)
class FieldDecl:
    """One LayerWeights field: its tensors' rows concatenated in order (q, k, v: one matmul instead of three)."""

    name: str
    parts: tuple[str, ...] = ()  # TensorDecl names; () means (name,)
    when: Callable[[ModelConfig], bool] = always  # whether a layer of this config has the field (biases)

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.parts or (self.name,)


@dataclass(frozen=True)
class NativeExtras:
    """What a layer adds to the native layer step's Llama layer (native/csrc/layer.cpp); the defaults are Llama's."""

    q_norm: torch.Tensor | None = None  # [hd]: an RMSNorm over every q head before rope (with k_norm)
    k_norm: torch.Tensor | None = None  # [hd]
    post_attn_norm: torch.Tensor | None = None  # [H]: normed attention output before its residual add
    post_ffn_norm: torch.Tensor | None = None  # [H]: likewise the FFN's
    gelu: bool = False  # GeGLU (tanh gelu) rather than SwiGLU
    window: int = 0  # attend only to keys after position - window (0: every key)
    scale: float = 0.0  # attention score scale (0: head_dim ** -0.5)
    bqkv: torch.Tensor | None = None  # [(nh + 2*nkv)*hd]: attention biases (Qwen2)
    bo: torch.Tensor | None = None  # [H]


class ModelModule(Protocol):
    """What a model file (model/llama.py) declares; model/registry.py finds it by architecture name."""

    GGUF_ARCHS: Mapping[str, str]  # GGUF general.architecture -> ModelConfig.arch
    HF_MODEL_TYPES: Mapping[str, str]  # HF config.json model_type -> ModelConfig.arch
    GGUF_WRITTEN_AS: Mapping[str, str]  # HF model_type -> the GGUF architecture llama.cpp's converter writes
    HF_CLASSES: Mapping[str, str]  # HF model_type -> the config.json "architectures" entry tierlm synth writes
    PERMUTED_QK_ARCHS: frozenset[str]  # GGUF architectures whose gguf_permuted tensors have permuted rows
    GGUF_CONFIG: ConfigTable  # read from a GGUFConfig (weights/gguf.py)
    HF_CONFIG: ConfigTable  # read from an HF config.json (weights/safetensors.py)
    HF_REFUSED: Mapping[str, str]  # config.json keys whose true value the forward cannot run -> the error
    GLOBAL_TENSORS: tuple[TensorDecl, ...]  # in file order (after_layers ones follow the layers)
    LAYER_TENSORS: tuple[TensorDecl, ...]  # in file order
    LAYER_FIELDS: tuple[FieldDecl, ...]  # in storage order (the offload store's layout)
    LayerWeights: type
    NATIVE_LAYER_STEP: bool  # whether native/csrc/layer.cpp computes this family's layer (model/native_layer.py)
    # native_extras(cfg, w, i) -> NativeExtras of layer i with weights w (what differs from Llama), or None where
    # layer.cpp cannot compute the layer
    native_extras: Callable | None
    # and its forward (the runner calls these): layer_forward(cfg, w, x, cos, sin, kv, ws, exact) updates the
    # residual x [B, T, H] in place; head(cfg, norm, lm_head, x, ws, exact) -> logits [B, T, V] fp32;
    # workspace_buffers(cfg, rows, act, kv, native_bytes) -> the layer step's BufferSpecs (memory/workspace.py)
    layer_forward: Callable
    head: Callable
    workspace_buffers: Callable
    # what the runner does around the layers: rope_inv_freqs(cfg, rope_freqs) -> the [hd/2] inverse frequencies of
    # each rope the layers use; layer_rope(cfg, i) -> which of them layer i uses; embed_scale(cfg) -> the factor the
    # embedding rows are multiplied by (in the compute dtype), or None
    rope_inv_freqs: Callable
    layer_rope: Callable
    embed_scale: Callable
    # for writers (tierlm synth, the tests' converter): gguf_metadata(cfg) -> {key under "{arch}.": int | float}
    # beyond the keys every architecture has (block count, lengths, heads, rope base, norm epsilon)
    gguf_metadata: Callable


def layer_tensor(model: ModelModule, name: str) -> TensorDecl:
    return next(t for t in model.LAYER_TENSORS if t.name == name)


def field_shape(model: ModelModule, field: FieldDecl, cfg: ModelConfig) -> tuple[int, ...]:
    """[sum of the parts' rows, *the rest]: the parts are stacked by rows."""
    shapes = [layer_tensor(model, p).shape(cfg) for p in field.tensors]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def field_is_matrix(model: ModelModule, field: FieldDecl) -> bool:
    return layer_tensor(model, field.tensors[0]).matrix
