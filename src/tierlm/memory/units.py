"""Units of placement: the pieces the planner places and the streamer moves, each as one aligned extent.

  layers.{i}  one decoder layer (norms, projections, biases)
  head        the lm_head matrix [V, H] (the embedding matrix when tied)
  embed       the embedding matrix [V, H] when untied (rows can be read on demand from disk)

The final norm and rope tables are tiny and always resident. Sizes are exact: each tensor starts 4 KiB-aligned,
as in the offload store, so the planner's bytes are the bytes that move.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tierlm.config import ModelConfig
from tierlm.memory.directio import align_up

HEAD, EMBED = "head", "embed"


def layer_unit(i: int) -> str:
    return f"layers.{i}"


@dataclass(frozen=True)
class UnitTensor:
    leaf: str  # name inside the unit: "wq", "lm_head", "embed"
    source_name: str  # internal tensor name in the model source: "layers.3.wq", "embed"
    shape: tuple[int, ...]


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Leaf -> shape of every tensor a layer of this config has, in storage order."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes: dict[str, tuple[int, ...]] = {"attn_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h)}
    if cfg.attention_bias:  # Qwen2 has q/k/v biases; Llama with attention_bias also bo (absent ones are skipped)
        shapes |= {"bq": (q,), "bk": (kv,), "bv": (kv,), "bo": (h,)}
    return shapes | {"wo": (h, q), "ffn_norm": (h,), "w_gate": (i, h), "w_up": (i, h), "w_down": (h, i)}


def unit_tensors(cfg: ModelConfig, unit: str) -> list[UnitTensor]:
    matrix = (cfg.vocab_size, cfg.hidden_size)
    if unit == HEAD:
        return [UnitTensor("lm_head", "embed" if cfg.tie_word_embeddings else "lm_head", matrix)]
    if unit == EMBED:
        return [UnitTensor("embed", "embed", matrix)]
    i = int(unit.removeprefix("layers."))
    return [UnitTensor(leaf, f"layers.{i}.{leaf}", s) for leaf, s in layer_shapes(cfg).items()]


def unit_nbytes(cfg: ModelConfig, unit: str, itemsize: int) -> int:
    return sum(align_up(math.prod(t.shape) * itemsize) for t in unit_tensors(cfg, unit))
