"""The WeightStore, the runner's layer loop and the memory estimate agree with what is really allocated."""
from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.config import attention_dtype
from tierlm.kvcache.paged import PagedKV
from tierlm.offload.estimate import kv_bytes, weight_bytes
from tierlm.offload.weight_store import WeightStore
from tierlm.offload.tier import Tier
from tierlm.weights import open_model


class RecordingStore(WeightStore):
    """A store that logs acquire/release calls (a subclass, not a patched method)."""

    def __init__(self, inner: WeightStore):
        super().__init__(inner.config, inner.norm, inner.rope_freqs, inner._layers, inner.tiers,
                         inner.head_weight, inner.embed_weight)
        self.log: list[tuple[str, int]] = []

    def acquire(self, i):
        self.log.append(("acquire", i))
        return super().acquire(i)

    def release(self, i):
        self.log.append(("release", i))
        super().release(i)


@pytest.mark.parametrize("name", ["llama3_rope", "llama_gqa_tied", "qwen2"])
@pytest.mark.parametrize("dtype, scheme", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_store_bytes_match_estimate(tiny_models, name, dtype, scheme):
    source = open_model(tiny_models[name].path)
    store = WeightStore.load_resident(source, dtype, progress=False)
    est = weight_bytes(source.config, scheme)
    assert store.tiers == [Tier.DEVICE] * source.config.num_layers
    assert store.layer_nbytes(0) == est.per_layer
    by_tier = store.nbytes_by_tier()
    assert by_tier[Tier.HOST] == by_tier[Tier.DISK] == 0
    assert by_tier[Tier.DEVICE] == est.total


def test_kv_cache_bytes_match_estimate(tiny_models):
    cfg = open_model(tiny_models["qwen2"].path).config
    kv = PagedKV(cfg, num_blocks=3 * 40 // 8, block_size=8, dtype=torch.float32)  # 3 sequences of 40 tokens
    assert kv.nbytes == kv_bytes(cfg, context=40, batch=3, dtype_bytes=4)
    kv.release()
    assert kv.nbytes == 0


def test_runner_acquires_and_releases_every_layer_in_order(tiny_models):
    llm = LLM(tiny_models["llama_gqa_tied"].path, progress=False)
    store = RecordingStore(llm.store)
    llm.runner.store = store
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    n = llm.config.num_layers
    one_pass = [(op, i) for i in range(n) for op in ("acquire", "release")]
    assert store.log == one_pass * 3  # prefill + 2 decode steps (the 3rd token needs no forward)
    assert len(out.token_ids) == 3


def test_tied_embeddings_share_storage(tiny_models):
    store = WeightStore.load_resident(open_model(tiny_models["llama_gqa_tied"].path), torch.float32, progress=False)
    assert store.head_weight.data_ptr() == store.embed_weight.data_ptr()


def test_bf16_run_keeps_kv_in_the_attention_dtype(tiny_models):
    """On a CPU without native bf16, a bf16 run's KV cache (and attention) is fp32, and the planner counts
    fp32 KV bytes; where bf16 is native (or on CUDA) the KV stays bf16."""
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expect = torch.bfloat16 if native else torch.float32
    assert attention_dtype(torch.bfloat16, cuda=False) == expect
    assert attention_dtype(torch.bfloat16, cuda=True) == torch.bfloat16
    assert attention_dtype(torch.float32, cuda=False) == torch.float32
    llm = LLM(tiny_models["llama_gqa_tied"].path, dtype="bfloat16", progress=False)
    kv = llm.kv  # the engine's pool
    assert kv.pool.k.dtype == expect
    assert kv.nbytes == kv_bytes(llm.config, kv.manager.num_blocks * kv.block_size, 1, torch.finfo(expect).bits // 8)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
