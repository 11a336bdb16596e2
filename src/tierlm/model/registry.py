"""Architecture name -> the model file that declares and computes it (model/family.py says what one declares).

A GGUF file is looked up by its general.architecture, an HF directory by config.json's model_type, a loaded
ModelConfig by its arch. Adding an architecture: write its file and list it in MODELS; nothing else names one.
"""
from __future__ import annotations

import math
from dataclasses import fields

from tierlm.config import ModelConfig
from tierlm.errors import UnsupportedModelError
from tierlm.model import gemma3, llama, phi3, qwen3
from tierlm.model.family import ModelModule


def _checked(model: ModelModule) -> ModelModule:
    """A declaration that contradicts itself fails at import, not in the middle of a load."""
    tensors = {t.name for t in model.LAYER_TENSORS}
    declared = [f.name for f in model.LAYER_FIELDS]
    assert sorted(declared) == sorted(f.name for f in fields(model.LayerWeights)), f"{model}: LayerWeights fields"
    assert all(p in tensors for f in model.LAYER_FIELDS for p in f.tensors), f"{model}: unknown field part"
    return model


MODELS: tuple[ModelModule, ...] = tuple(_checked(m) for m in (llama, qwen3, gemma3, phi3))

_BY_GGUF = {name: m for m in MODELS for name in m.GGUF_ARCHS}
_BY_HF = {name: m for m in MODELS for name in m.HF_MODEL_TYPES}
_BY_ARCH = {arch: m for m in MODELS for arch in (*m.GGUF_ARCHS.values(), *m.HF_MODEL_TYPES.values())}


def _find(table: dict[str, ModelModule], name: object) -> ModelModule:
    if not isinstance(name, str) or name not in table:
        raise UnsupportedModelError(f"unsupported architecture {name!r} (supported: {', '.join(table)})")
    return table[name]


def for_gguf(arch: object) -> ModelModule:
    """The model of a GGUF general.architecture (None or anything unknown: UnsupportedModelError)."""
    return _find(_BY_GGUF, arch)


def for_hf(model_type: object) -> ModelModule:
    """The model of an HF config.json model_type."""
    return _find(_BY_HF, model_type)


def for_config(cfg: ModelConfig) -> ModelModule:
    return _find(_BY_ARCH, cfg.arch)


def gguf_written_as(model_type: object) -> str:
    """The GGUF architecture llama.cpp's converter writes for an HF model_type (Mistral: "llama")."""
    return for_hf(model_type).GGUF_WRITTEN_AS[model_type]


def layer_param_count(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer (projections, biases, norms): its tensors, as its model declares them."""
    return sum(math.prod(t.shape(cfg)) for t in for_config(cfg).LAYER_TENSORS if t.present(cfg))


def param_count(cfg: ModelConfig) -> int:
    """Unique parameters: tied embeddings are counted once."""
    embed = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else embed
    return embed + head + cfg.hidden_size + cfg.num_layers * layer_param_count(cfg)
