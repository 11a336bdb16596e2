"""The engine loop: prefill chunks beside running decodes, preemption, aborts and failures change no output
and leak no block; admission is a side-effect-free probe; incremental text equals a full decode."""
from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.engine.detok import IncrementalDetokenizer
from tierlm.engine.engine import Engine
from tierlm.errors import UsageError

CHUNK = 8  # a small prefill chunk: prompts of 3-40 tokens take up to 5 chunks


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _llm(path, max_num_seqs: int = 4, budget: int = CHUNK + 4, **kw) -> LLM:
    """An LLM whose engine prefills in chunks of CHUNK, at most `budget` tokens a step."""
    llm = LLM(path, progress=False, **kw)
    llm.runner.prefill_chunk = CHUNK
    llm.engine = Engine(llm.runner, llm.tokenizer, llm.kv, max_num_seqs, budget)
    return llm


@pytest.fixture(scope="module")
def path(tiny_models):
    return tiny_models["llama_gqa_tied"].path


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                                    SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, ignore_eos=True, seed=3)])
def test_mixed_steps_equal_one_by_one(path, params):
    llm = _llm(path)
    prompts = _prompts(7)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    c = llm.engine.scheduler.counters
    before = c.mixed_steps
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == alone
    assert c.mixed_steps > before  # chunks of later prompts really ran beside running decodes
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks


def test_preemption_and_abort_leave_no_block_behind(path):
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    prompts = _prompts(6, seed=1)
    ref = _llm(path, enable_prefix_caching=False)
    want = [ref.generate([p], params)[0].token_ids for p in prompts]
    from tierlm.kvcache.pool import block_nbytes
    per_block = block_nbytes(ref.config, 4, torch.float32)
    llm = _llm(path, block_size=4, kv_memory=16 * per_block)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert llm.engine.scheduler.counters.preemptions > 0
    # abort one request mid-way: its final update says so, the others are untouched, every block comes back
    eng, seen = llm.engine, {}
    reqs = [eng.add_request(p, params, lambda u: seen.setdefault(u.request_id, []).append(u)) for p in prompts[:3]]
    for _ in range(6):
        eng.step()
    eng.abort(reqs[1].id)
    eng.run()
    assert seen[reqs[1].id][-1].finish_reason == "abort" and len(reqs[1].out.token_ids) < 14
    assert [r.out.token_ids for r in (reqs[0], reqs[2])] == [want[0], want[2]]
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks


def test_a_failing_step_fails_its_requests_and_frees_their_blocks(path):
    llm = _llm(path)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    real = llm.runner.forward_groups
    calls = {"n": 0}

    def flaky(groups):  # the third step fails, as a checksum error or Ctrl-C would
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk went away")
        return real(groups)
    llm.runner.forward_groups = flaky
    with pytest.raises(OSError):
        llm.generate(_prompts(3, seed=2), params)
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks and not llm.engine.has_unfinished
    out = llm.generate(_prompts(2, seed=5), params)  # the engine goes on
    assert all(len(o.token_ids) == 8 for o in out)


def test_admission_is_a_probe_then_a_commit(path):
    """A request that does not fit waits without touching the prefix-cache counters each step."""
    from tierlm.kvcache.pool import block_nbytes
    llm = _llm(path, block_size=4, kv_memory=12 * block_nbytes(LLM(path, progress=False).config, 4, torch.float32))
    eng = llm.engine
    # 40 prompt tokens: 11 of the 12 blocks reserved at admission (the prompt and its first decode)
    big = eng.add_request(list(range(2, 42)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    eng.step()
    # shares big's first 2 blocks but needs 2 more: it cannot have them while big runs
    waiting = eng.add_request(list(range(2, 14)), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    queried = llm.kv.queried_tokens
    for _ in range(2):
        eng.step()
    assert waiting.status.value == "waiting" and llm.kv.queried_tokens == queried
    eng.run()
    assert len(big.out.token_ids) == 4 and len(waiting.out.token_ids) == 20
    assert llm.kv.queried_tokens == queried + 12  # looked up once, when admitted


def test_stream_closed_early_frees_blocks(path):
    llm = _llm(path)
    it = llm.stream(list(range(2, 20)), SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks and not llm.engine.has_unfinished


def test_step_budget_must_hold_a_chunk_and_every_decode(path):
    with pytest.raises(UsageError, match="max_num_batched_tokens"):
        LLM(path, progress=False, max_num_batched_tokens=100)


def test_incremental_text_equals_full_decode():
    from tierlm.weights import open_model
    from tierlm.weights.embedded import embedded_model_path
    tok = open_model(str(embedded_model_path())).tokenizer
    text = "Hello, wörld! 🚀 Ünïcödé — naïve café; numbers 12345 and    spaces.\nNew line."
    ids = tok.encode(text) + torch.randint(0, tok.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    d = IncrementalDetokenizer(tok, [])
    streamed = "".join(d.add(i) for i in ids) + d.flush()
    assert streamed == d.text == tok.decode(ids)
    stop = IncrementalDetokenizer(tok, ["café", "zzz"])
    streamed = "".join(stop.add(i) for i in tok.encode(text)) + stop.flush()
    assert stop.stopped and streamed == stop.text == text[:text.index("café")]


def test_tenant_specs():
    from tierlm.engine.quota import Quota, parse_tenant
    assert parse_tenant("k1=alice:running=2,kv_blocks=100") == ("k1", "alice", Quota(running=2, kv_blocks=100))
    assert parse_tenant("k2=bob") == ("k2", "bob", Quota())
    for bad in ("nokey", "k=", "k=a:running=0", "k=a:speed=3"):
        with pytest.raises(UsageError, match="--tenant"):
            parse_tenant(bad)
