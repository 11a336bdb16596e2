"""Prompt log-probabilities through the engine (vLLM's prompt_logprobs): they are the log_softmax of the
prompt's logits (LLM.prompt_logits) at the next prompt token, a scoring request changes nothing for the
requests beside it, and max_tokens=0 scores a prompt without generating."""
from __future__ import annotations

import pytest
import torch
from helpers import chunked_engine

from tierlm import LLM, SamplingParams
from tierlm.errors import ContextLengthError, UsageError

CHUNK = 8  # prompts of 20-40 tokens are scored in several chunks


def _prompts(n: int, seed: int = 0, lo: int = 20, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_models):
    """An LLM whose engine prefills in chunks of CHUNK."""
    llm = LLM(tiny_models["llama_gqa_tied"].path, progress=False, max_context=64)
    llm.engine = chunked_engine(llm, CHUNK)
    yield llm
    llm.close()


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_are_the_log_softmax_of_the_prompt_logits(llm, k):
    ids = _prompts(1)[0]
    logits = llm.prompt_logits(ids)  # [T, V]
    assert logits.shape == (len(ids), llm.config.vocab_size) and logits.dtype == torch.float32
    out = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=k))[0]
    lp = torch.log_softmax(logits, dim=-1)  # [T, V]
    want = lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]  # position p scores token p + 1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    assert [e.token_id for e in out.prompt_logprobs[1:]] == ids[1:]
    assert torch.equal(torch.tensor([e.logprob for e in out.prompt_logprobs[1:]]), want)
    for p, e in enumerate(out.prompt_logprobs[1:]):
        top = torch.topk(lp[p], k) if k else None
        assert e.top == (tuple(zip(top.indices.tolist(), top.values.tolist())) if k else ())
    # the logits of the last prompt position are what a generation samples its first token from
    first = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))[0].token_ids
    assert first == [int(logits[-1].argmax())]


def test_a_scoring_request_beside_others_changes_nothing(llm):
    prompts = _prompts(3, seed=1)
    scored = _prompts(1, seed=2)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, ignore_eos=True, seed=5)
    alone = [llm.generate([p], s)[0].token_ids for p, s in zip(prompts, (greedy, seeded, greedy))]
    want = llm.generate([scored], SamplingParams(max_tokens=0, prompt_logprobs=2))[0].prompt_logprobs
    # scored's prompt is cached now: a scoring request still computes (and scores) every position
    eng = llm.engine
    reqs = [eng.add_request(p, s) for p, s in zip(prompts[:2], (greedy, seeded))]
    scoring = eng.add_request(scored, SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=2,
                                                     ignore_eos=True))
    reqs.append(eng.add_request(prompts[2], greedy))
    eng.run()
    assert [r.out.token_ids for r in reqs] == alone
    assert scoring.out.prompt_logprobs == want and scoring.out.cached_tokens == 0
    # and it generates what it would without prompt_logprobs
    plain = llm.generate([scored], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert plain.cached_tokens > 0 and scoring.out.token_ids == plain.token_ids
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks


def test_max_tokens_zero_scores_the_prompt_only(llm):
    ids = _prompts(1, seed=3)[0]
    out = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.finish_reason == "length" and out.token_ids == [] and out.text == ""
    assert len(out.prompt_logprobs) == len(ids) and out.metrics.ttft_s > 0
    assert llm.generate([ids], SamplingParams(max_tokens=3))[0].prompt_logprobs is None
    with pytest.raises(UsageError, match="prompt_logprobs"):
        llm.generate([ids], SamplingParams(max_tokens=0))
    with pytest.raises(UsageError, match="prompt_logprobs must be"):
        SamplingParams(prompt_logprobs=21)
    # a scoring prompt may fill the whole context (no token follows it); a generating one may not
    full = (ids * 4)[:llm.max_context]
    assert len(llm.prompt_logits(full)) == llm.max_context
    with pytest.raises(ContextLengthError):
        llm.generate([full], SamplingParams(max_tokens=1))
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks


def test_a_prompt_is_scored_a_slice_of_rows_at_a_time(llm, monkeypatch):
    """A scoring chunk's head runs Runner.score_rows rows at a time (its fp32 logits and their log_softmax take
    the room of one layer's prefill transients, not a [T, V] tensor): the slices cover the prompt in order, none
    wider than score_rows, and give the logprobs whole chunks give (to fp32 rounding: fewer matmul rows)."""
    from tierlm.engine.request import EngineRequest
    ids = _prompts(1, seed=4)[0]
    want = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0].prompt_logprobs
    seen, real = [], EngineRequest.score

    def spy(self, start, logits):
        seen.append((start, logits.shape[0]))
        real(self, start, logits)

    monkeypatch.setattr(EngineRequest, "score", spy)
    monkeypatch.setattr(llm.runner, "score_rows", 3)
    got = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0].prompt_logprobs
    starts = [s for s, _ in seen]
    assert max(n for _, n in seen) <= 3 and starts == sorted(starts) and sum(n for _, n in seen) == len(ids)
    assert [s + n for s, n in seen[:-1]] == starts[1:]
    assert torch.allclose(torch.tensor([e.logprob for e in got[1:]]), torch.tensor([e.logprob for e in want[1:]]),
                          atol=1e-5)


def test_a_preempted_scoring_request_scores_its_prompt_again(tiny_models):
    """A pool that runs short preempts the newest request: a scoring request preempted mid-prompt starts its
    scoring over when it is readmitted, and ends with the logprobs of a run alone."""
    from tierlm.kvcache.pool import block_nbytes
    path = tiny_models["llama_gqa_tied"].path
    probe = LLM(path, progress=False, max_context=64)  # alone, in the same chunks (fp32: chunks round their own way)
    per_block = block_nbytes(probe.config, 16, probe.kv.pool.storage)
    probe.engine = chunked_engine(probe, CHUNK)
    ids = _prompts(1, seed=5, lo=38, hi=40)[0]
    want = probe.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=1))[0].prompt_logprobs
    probe.close()
    llm = LLM(path, progress=False, max_context=64, kv_memory=4 * per_block, enable_prefix_caching=False)
    llm.engine = chunked_engine(llm, CHUNK)
    eng = llm.engine
    long = eng.add_request(_prompts(1, seed=6, lo=14, hi=15)[0],  # 14 tokens: a second block 2 decodes in
                           SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    eng.step()  # the long request runs first, and decodes while the scoring request's prompt is computed
    scoring = eng.add_request(ids, SamplingParams(max_tokens=0, prompt_logprobs=1))
    eng.run()
    assert eng.scheduler.counters.preemptions > 0 and long.out.finish_reason == "length"
    assert scoring.out.prompt_logprobs == want
    llm.close()
