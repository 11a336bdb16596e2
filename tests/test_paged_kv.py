"""The paged KV cache: the same logits whatever the block size (one block holding the whole sequence is the
contiguous layout), the chunking or a prefix hit, prefix hits change nothing but the work done,
batched generation equals one-by-one, preemption loses nothing, int8 KV stays close."""
from __future__ import annotations

import pytest
import torch
from helpers import chunked_engine, engine_logits

from tierlm import LLM, SamplingParams
from tierlm.errors import KVCacheFullError
from tierlm.kvcache.blocks import ROOT_HASH, BlockManager

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _prompts(n: int, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("block_size", [16, 5])
def test_paged_logits_equal_contiguous(tiny, block_size):
    """Chunked prefill (chunks of 7) then decode steps: every logit bit-identical to a pool whose one block
    holds the whole sequence (sliding window included); close to the prompt prefilled whole and to a prefix
    hit's suffix (other chunk boundaries: matmuls of other row counts round differently)."""
    prompt = _prompts(1, seed=3)[0] + list(range(5, 30))
    llm = LLM(tiny.path, progress=False, block_size=block_size)
    got, fed = engine_logits(chunked_engine(llm, 7), prompt, steps=3)  # [T + 3, V]
    contiguous = LLM(tiny.path, progress=False, block_size=128)
    want, fed_want = engine_logits(chunked_engine(contiguous, 7), prompt, steps=3)
    assert fed == fed_want and torch.equal(got, want)
    close = dict(rtol=0, atol=1e-4)
    torch.testing.assert_close(engine_logits(llm.engine, prompt, steps=3)[0], want, **close)  # one chunk
    hits = llm.kv.hit_tokens
    suffix, _ = engine_logits(chunked_engine(llm, 7), prompt, steps=3, score=False)  # the prompt is cached now
    assert llm.kv.hit_tokens > hits
    torch.testing.assert_close(suffix, want[len(prompt) - 1:], **close)


def test_block_manager_lru_refcount_and_collisions():
    m = BlockManager(num_blocks=3, block_size=2, salt=b"s")
    (a, _), (b, _) = m.allocate(), m.allocate()
    h = m.register(a, ROOT_HASH, (1, 2))
    m.release(a)  # cached and free
    m.release(b)  # uncached and free: reused before the cached block
    assert m.num_free == 3 and m.num_cached_free == 1
    assert m.allocate() == (b, None)
    got, _ = m.lookup(ROOT_HASH, (1, 2))  # a hit takes the block back from the free list
    assert got == a and m.refcount[a] == 1 and m.num_free == 1
    m.release(a)
    m.tokens_of[a] = (9, 9)  # as if another prefix had hashed to h: the token check refuses it
    assert m.lookup(ROOT_HASH, (1, 2))[0] is None and m.by_hash[h] == a
    m.tokens_of[a] = (1, 2)
    m.allocate()  # the never-used block goes first ...
    assert m.counters.evictions == 0
    block, evicted = m.allocate()  # ... then the cached one, which is forgotten (and reported for a lower tier)
    assert block == a and m.counters.evictions == 1 and evicted.hash == h and evicted.tokens == (1, 2)
    assert m.lookup(ROOT_HASH, (1, 2))[0] is None
    with pytest.raises(MemoryError):
        m.allocate()
    # a prefix match always leaves the last token to compute: 4 tokens, block 2 -> only the first block
    m2 = BlockManager(num_blocks=4, block_size=2)
    blocks = [m2.allocate()[0], m2.allocate()[0]]
    parent = m2.register(blocks[0], ROOT_HASH, (1, 2))
    m2.register(blocks[1], parent, (3, 4))
    got, last = m2.match_prefix([1, 2, 3, 4])
    assert got == [blocks[0]] and last == parent


def test_prefix_hit_skips_prefill_and_changes_nothing(tiny_models):
    path = tiny_models["qwen2"].path
    shared = list(range(3, 60))  # 57 tokens: 3 full blocks of 16
    prompts = [shared + [70, 71], shared + [90]]
    cold = LLM(path, progress=False, enable_prefix_caching=False)
    want = [cold.generate([p], GREEDY)[0].token_ids for p in prompts]
    llm = LLM(path, progress=False)
    got = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert got == want
    assert llm.kv.hit_tokens == 48  # the second prompt reused the 3 full blocks of the first
    assert cold.kv.hit_tokens == 0


def test_batch_equals_one_by_one(tiny_models):
    llm = LLM(tiny_models["llama_gqa_tied"].path, progress=False)
    prompts = _prompts(6)
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=12, ignore_eos=True, seed=7)
    for p in (GREEDY, params):
        one = [llm.generate([x], p)[0].token_ids for x in prompts]
        batch = llm.generate(prompts, p)
        assert [o.token_ids for o in batch] == one
        assert all(o.finish_reason == "length" for o in batch)


def test_preemption_keeps_outputs_intact(tiny_models):
    """A pool of 16 blocks of 4 tokens cannot hold 6 growing sequences: some are preempted, recomputed, and
    every output still equals the one-by-one run."""
    path = tiny_models["llama_gqa_tied"].path
    prompts = _prompts(6, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    ref = LLM(path, progress=False, enable_prefix_caching=False)
    one = [ref.generate([x], params)[0].token_ids for x in prompts]
    llm = LLM(path, progress=False, block_size=4, kv_memory=16 * _block_bytes(path, block_size=4))
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == one
    assert llm.engine.scheduler.counters.preemptions > 0
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks  # every block returned


def _block_bytes(path, block_size: int) -> int:
    from tierlm.kvcache.pool import block_nbytes
    from tierlm.weights import open_model
    return block_nbytes(open_model(path).config, block_size, torch.float32)


def test_request_larger_than_the_pool_is_a_clear_error(tiny_models):
    path = tiny_models["qwen2"].path
    llm = LLM(path, progress=False, block_size=4, kv_memory=2 * _block_bytes(path, 4))
    with pytest.raises(KVCacheFullError, match="kv_memory"):
        llm.generate([[5] * 6], GREEDY)
    with pytest.raises(KVCacheFullError, match="kv_memory"):
        llm.generate([[5] * 6, [6] * 3], GREEDY)


def test_int8_kv_is_close_and_smaller(tiny_models):
    path = tiny_models["mistral"].path
    ref, q = LLM(path, progress=False), LLM(path, progress=False, kv_dtype="int8")
    assert q.kv.pool.k.dtype == torch.int8
    assert q.kv.nbytes / q.kv.manager.num_blocks < 0.3 * ref.kv.nbytes / ref.kv.manager.num_blocks
    ids = _prompts(1, seed=5)[0]
    a, b = ref.prompt_logits(ids), q.prompt_logits(ids)  # [T, V] each
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_stats_count_blocks_hits_and_waste(tiny_models):
    path = tiny_models["qwen2"].path
    llm = LLM(path, progress=False, block_size=8)
    shared = list(range(3, 40))  # 37 tokens: 4 full blocks of 8
    llm.generate([shared + [50]], GREEDY)
    s = llm.kv_stats()
    assert s.used == 0 and s.cached == 5 and s.free == s.blocks - 5  # 38 + 10 tokens -> 6 blocks, 5 full
    assert s.hit_tokens == 0 and s.queried_tokens == 38
    llm.generate([shared + [60]], GREEDY)
    s = llm.kv_stats()
    assert s.hit_tokens == 32 and s.hit_rate == pytest.approx(32 / 76)
    # waste while sequences hold blocks: one sequence of 13 tokens in 2 blocks of 8 -> 3 of 16 slots empty
    req = llm.engine.add_request(list(range(100, 113)), GREEDY)
    llm.engine.step()  # its prefill: 13 tokens computed, 14 slots reserved (+ its first decode)
    assert req.seq.num_computed == 13
    assert llm.kv_stats().used == 2 and llm.kv_stats().waste == pytest.approx(3 / 16)
    llm.engine.cancel([req.id])
    assert "prefix hits 32/" in llm.kv_stats().describe()


def test_cli_kv_flags(capsys, tiny_models):
    from tierlm.cli import main
    code = main(["generate", "--model", str(tiny_models["qwen2"].path), "--prompt", "hello there", "--max-tokens", "3",
                 "--kv-dtype", "int8", "--block-size", "4", "--kv-memory", "1MiB", "--stats", "--temperature", "0"])
    err = capsys.readouterr().err
    assert code == 0 and "KV (int8, " in err and "blocks of 4 tokens" in err
    code = main(["generate", "--model", str(tiny_models["qwen2"].path), "--prompt", "hi", "--kv-memory", "1KiB"])
    assert code == 2 and "below one KV block" in capsys.readouterr().err


def test_sliding_window_frees_blocks_outside_the_window(tiny_models):
    """Mistral with window 8, blocks of 4: a sequence holds at most 4 blocks however long it grows, and its
    logits equal those of a pool whose one block keeps everything, step for step."""
    path = tiny_models["mistral_swa"].path
    llm = LLM(path, progress=False, block_size=4, kv_memory=16 * _block_bytes(path, block_size=4))
    engine = chunked_engine(llm, 5)
    ids = list(range(3, 23))
    params = SamplingParams(temperature=0.0, max_tokens=41, ignore_eos=True, prompt_logprobs=0)
    req = engine.add_request(ids, params, keep_logits=True)  # 60 tokens fed in all: 15 blocks' worth
    seen = 0
    while engine.has_unfinished:
        engine.step()
        if req.seq.blocks:  # still running
            seen = max(seen, req.seq.num_computed)
            assert len(req.seq.held) <= 4 or req.prefilling  # admission reserved the whole prompt
            assert req.seq.num_dropped == max(0, (req.seq.num_computed - 8 + 1) // 4)  # each block, last key <= n - 8
    assert seen == 59 and len(req.out.token_ids) == 41  # the last decode step frees it as it finishes
    want, _ = engine_logits(chunked_engine(LLM(path, progress=False, block_size=128), 5), ids, steps=40)
    assert torch.equal(torch.cat(req.logits), want)
    assert llm.kv.manager.num_free == 16


def test_batch_stops_on_eos_and_stop_strings_like_one_by_one(tiny_models):
    llm = LLM(tiny_models["qwen2"].path, progress=False)
    prompts = _prompts(5, seed=9)
    free_run = llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    stop = free_run.text[2:5] or "e"  # a string the first prompt's continuation contains
    params = SamplingParams(temperature=0.0, max_tokens=12, stop=[stop])
    one = [llm.generate([p], params)[0] for p in prompts]
    batch = llm.generate(prompts, params)
    assert [(o.text, o.token_ids, o.finish_reason) for o in batch] == \
           [(o.text, o.token_ids, o.finish_reason) for o in one]
    assert batch[0].finish_reason == "stop" and stop not in batch[0].text
