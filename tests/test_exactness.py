"""Exactness on the real numerics (the embedded Q4_1 model: int4 weights, bf16 activations): a token's bits do
not depend on the batch, on the chunk it was prefilled in, on a prefix-cache hit or on a preemption."""
from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.kvcache.attention import BlockMask, blocked_attention, tree_sum
from tierlm.kvcache.pool import block_nbytes

PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
PROMPTS = [[1 + (7 * k + i) % 400 for i in range(60 + 10 * k)] for k in range(10)]  # 60..150 tokens


def test_tree_sum_is_blind_to_trailing_zeros():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    for n in (6, 8, 11, 32):
        padded = torch.cat([x, torch.zeros(3, n - 5, 7, dtype=x.dtype)], dim=1)
        assert torch.equal(tree_sum(padded.clone(), 1), tree_sum(x.clone(), 1))
    assert torch.allclose(tree_sum(x.float(), 1), x.float().sum(1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nh,nkv,hd", [(8, 2, 64), (4, 1, 256)])  # Llama-like; Gemma 3 270M's heads
def test_a_token_attends_the_same_in_any_chunk(dtype, nh, nkv, hd):
    torch.manual_seed(1)
    b, bs, s = 1, 16, 160  # g = 4 query heads per KV head: a decode step's 4 rows are padded (MIN_ROWS)
    k, v = torch.randn(b, nkv, s, hd, dtype=dtype), torch.randn(b, nkv, s, hd, dtype=dtype)
    q = torch.randn(b, nh, s, hd, dtype=dtype)
    whole = blocked_attention(q, k, v, BlockMask.of(torch.arange(s)[None], s // bs, bs))  # a cold 160-row prefill
    for start, t in ((100, 60), (144, 16), (159, 1), (37, 5), (3, 2)):  # a suffix after a hit, a decode step, chunks
        pos = torch.arange(start, start + t)[None]
        nb = -(-(start + t) // bs)
        part = blocked_attention(q[:, :, start:start + t], k[:, :, :nb * bs], v[:, :, :nb * bs], BlockMask.of(pos, nb, bs))
        assert torch.equal(part, whole[:, :, start:start + t])


@pytest.fixture(scope="module")
def cold() -> tuple[LLM, list[list[int]]]:
    """Each prompt run alone, cold: prefix caching is on but no prompt shares a leading block with another, so
    nothing hits (checked); their blocks stay cached for the warm reruns of test_prefix_hits_equal_cold_runs."""
    llm = LLM(progress=False)
    outs = [llm.generate([p], PARAMS)[0].token_ids for p in PROMPTS]
    assert llm.kv.hit_tokens == 0
    return llm, outs


@pytest.fixture(scope="module")
def solo(cold) -> list[list[int]]:
    return cold[1]


@pytest.mark.slow
def test_preempted_and_batched_requests_equal_solo_runs(cold, solo):
    # 22 blocks, whatever the KV's dtype on this CPU (fp32 where it has no native bf16): preemptions
    per_block = block_nbytes(cold[0].config, cold[0].kv.block_size, cold[0].kv.pool.storage)
    llm = LLM(progress=False, kv_memory=22 * per_block, enable_prefix_caching=False)
    got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert llm.engine.scheduler.counters.preemptions > 0 and llm.engine.scheduler.counters.max_running > 1
    assert got == solo


@pytest.mark.slow
def test_prefix_hits_equal_cold_runs(cold):
    llm, solo = cold  # cold: each prompt's blocks are cached
    warm = [llm.generate([p], PARAMS)[0].token_ids for p in PROMPTS]  # hits: only the suffix is prefilled
    assert llm.kv.hit_tokens > 0 and warm == solo
