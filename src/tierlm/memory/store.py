"""WeightStore: the runner's only way to reach weights. Records the tier of every layer.

In this version every layer is resident on DEVICE; the host and disk tiers plug in behind
acquire()/release() without the runner changing. Invariant: a layer's tensors are valid from
acquire(i) until release(i); the runner releases every layer it acquires, in order.
"""
from __future__ import annotations

from dataclasses import fields

import torch

from tierlm.config import ModelConfig
from tierlm.memory.tiers import Tier
from tierlm.progress import progress_bar
from tierlm.model.llama import GlobalWeights, LayerWeights
from tierlm.weights.names import layer_name
from tierlm.weights.source import ModelSource

_LAYER_FIELDS = [f.name for f in fields(LayerWeights)]


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class WeightStore:
    def __init__(self, config: ModelConfig, globals_: GlobalWeights, layers: list[LayerWeights],
                 tiers: list[Tier]):
        self.config = config
        self.globals = globals_
        self._layers = layers
        self.tiers = tiers  # tier of each layer, index = layer number
        self._acquired: set[int] = set()

    @classmethod
    def load_resident(cls, source: ModelSource, dtype: torch.dtype, device: torch.device | str = "cpu",
                      progress: bool | None = None) -> "WeightStore":
        """Read every tensor into `device` memory in `dtype` (dequantising as needed)."""
        cfg = source.config
        present = set(source.tensor_names())
        bar = progress_bar(len(present), "loading weights", progress, unit="tensor")

        def get(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor | None:
            if name not in present:
                return None
            t = source.load(name, as_dtype).to(device)
            bar.update()
            return t

        embed = get("embed")
        lm_head = embed if cfg.tie_word_embeddings else get("lm_head")
        rope_freqs = get("rope_freqs", torch.float32)  # rope math stays fp32 whatever the compute dtype
        globals_ = GlobalWeights(embed=embed, norm=get("norm"), lm_head=lm_head, rope_freqs=rope_freqs)
        layers = [LayerWeights(**{f: get(layer_name(i, f)) for f in _LAYER_FIELDS}) for i in range(cfg.num_layers)]
        bar.close()
        return cls(cfg, globals_, layers, [Tier.DEVICE] * cfg.num_layers)

    def acquire(self, i: int) -> LayerWeights:
        """Layer i's weights, valid until release(i)."""
        self._acquired.add(i)
        return self._layers[i]

    def release(self, i: int) -> None:
        self._acquired.discard(i)

    def layer_nbytes(self, i: int) -> int:
        return sum(_nbytes(getattr(self._layers[i], f)) for f in _LAYER_FIELDS)

    def nbytes_by_tier(self) -> dict[Tier, int]:
        out = {t: 0 for t in Tier}
        for i, tier in enumerate(self.tiers):
            out[tier] += self.layer_nbytes(i)
        g = self.globals
        out[Tier.DEVICE] += _nbytes(g.embed) + _nbytes(g.norm) + (0 if g.lm_head is g.embed else _nbytes(g.lm_head))
        return out
