"""Units of placement: the pieces the planner places and the streamer moves, each as one aligned extent.

  layers.{i}  one decoder layer (norms, fused projections, biases)
  head        the lm_head matrix [V, H] (the embedding matrix when tied)
  embed       the embedding matrix [V, H] when untied, or tied under quantisation (rows read on demand)

Inside a layer, tensors are stored as the model's LayerWeights fields (model/llama.py LAYER_FIELDS): for the
Llama family q/k/v are one matrix `wqkv` and gate/up one matrix `w_gateup` (rows concatenated): one matmul
instead of three and two. A quantised matrix is stored as its parts (qweight, scales, mins), each a
tensor of its own. The final norm and rope tables are tiny and always resident. Sizes are exact: each
stored tensor starts 4 KiB-aligned, as in the offload store, so the planner's bytes are the bytes that move.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tierlm.config import ModelConfig
from tierlm.memory.directio import align_up
from tierlm.model import registry
from tierlm.model.family import field_shape, layer_name
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import dense_or_parts_nbytes

HEAD, EMBED = "head", "embed"


def layer_unit(i: int) -> str:
    return f"layers.{i}"


@dataclass(frozen=True)
class UnitTensor:
    leaf: str  # name inside the unit: "wqkv", "lm_head", "embed"
    source_names: tuple[str, ...]  # internal names in the model source, rows concatenated in this order
    shape: tuple[int, ...]
    # A tied embedding stored apart from its quantised head: the head's quantised values, dense, so rows read
    # from disk equal rows dequantised from the resident head bit for bit.
    dequantized: bool = False

    def scheme(self, quant: QuantScheme) -> QuantScheme:
        return quant.for_unit("lm_head" if self.dequantized else self.leaf, self.source_names, self.shape)


def layer_tensors(cfg: ModelConfig, i: int) -> list[UnitTensor]:
    """Every tensor a layer of this config has, in storage order (absent optional biases are skipped later): the
    model's LayerWeights fields as it declares them (model/registry.py)."""
    model = registry.for_config(cfg)
    return [UnitTensor(f.name, tuple(layer_name(i, p) for p in f.tensors), field_shape(model, f, cfg))
            for f in model.LAYER_FIELDS if f.when(cfg)]


def unit_tensors(cfg: ModelConfig, unit: str) -> list[UnitTensor]:
    matrix = (cfg.vocab_size, cfg.hidden_size)
    if unit == HEAD:
        return [UnitTensor("lm_head", ("embed" if cfg.tie_word_embeddings else "lm_head",), matrix)]
    if unit == EMBED:
        return [UnitTensor("embed", ("embed",), matrix, dequantized=cfg.tie_word_embeddings)]
    return layer_tensors(cfg, int(unit.removeprefix("layers.")))


def unit_nbytes(cfg: ModelConfig, unit: str, dtype: torch.dtype, quant: QuantScheme = QuantScheme()) -> int:
    """Bytes of the unit's extent: every stored tensor (or quantised part) 4 KiB-aligned."""
    return sum(align_up(b) for t in unit_tensors(cfg, unit)
               for b in dense_or_parts_nbytes(QuantScheme() if t.dequantized else t.scheme(quant), t.shape, dtype))
