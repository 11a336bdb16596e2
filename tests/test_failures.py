"""A failing request fails alone (issue 23): an error in a forward pass is traced to the request that causes it
by running the pass's requests one at a time; an error in one request's own rows (sampling, scoring) ends that
request only; the others finish exactly as they would alone, nothing is retried forever, no block leaks."""
from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.engine.engine import Engine

CHUNK = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_models):
    return tiny_models["llama_gqa_tied"].path


def _llm(path) -> LLM:
    llm = LLM(path, progress=False)
    llm.runner.prefill_chunk = CHUNK
    llm.engine = Engine(llm.runner, llm.tokenizer, llm.kv, 4, CHUNK + 4)
    return llm


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(2, 512, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _poison(llm: LLM, bad: set[int]) -> list[int]:
    """Make every forward pass that holds a sequence of a request in `bad` (ids of request objects) raise, as a
    pass that one request breaks would; returns the log of pass sizes (requests per pass) that raised."""
    real, raised = llm.runner.forward_groups, []

    def forward_groups(groups):
        seqs = [s for _, step, _, _ in groups for s in step.seqs]
        if any(id(s) in bad for s in seqs):
            raised.append(len(seqs))
            raise RuntimeError("this request breaks the pass")
        return real(groups)
    llm.runner.forward_groups = forward_groups
    return raised


def _run(engine: Engine, expected: type[Exception] = RuntimeError) -> int:
    """Step until done, as the server's loop does (an error is counted, the loop goes on); the errors seen."""
    errors = 0
    for _ in range(10_000):
        if not engine.has_unfinished:
            return errors
        try:
            engine.step()
        except expected:
            errors += 1
    raise AssertionError("the engine did not finish: a request is retried forever")


def test_a_request_that_breaks_the_pass_fails_alone(path):
    prompts = _prompts(4)
    alone = [o.token_ids for o in _llm(path).generate(prompts, GREEDY)]
    llm = _llm(path)
    reqs = [llm.engine.add_request(p, GREEDY) for p in prompts]
    llm.engine.step()  # all four admitted and prefilling together
    bad = reqs[2]
    raised = _poison(llm, {id(bad.seq)})
    errors = _run(llm.engine)
    assert bad.out.finish_reason == "error"
    # the pass with everyone failed, then the bad request failed alone: never retried after that
    assert raised[0] > 1 and raised[-1] == 1 and len(raised) == 2 and errors == 2
    for i, r in enumerate(reqs):
        if r is not bad:
            assert r.out.finish_reason == "length" and r.out.token_ids == alone[i]
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks
    c = llm.engine.counters
    assert c.failed_passes == 2 and c.consecutive_failed_passes == 0 and c.failed_requests == 1


def test_a_failing_decode_step_is_traced_too(path):
    """Suspects found in a decode batch: the innocent ones resume decoding, each with its own tokens."""
    prompts = _prompts(3)
    alone = [o.token_ids for o in _llm(path).generate(prompts, GREEDY)]
    llm = _llm(path)
    reqs = [llm.engine.add_request(p, GREEDY) for p in prompts]
    while not all(len(r.out.token_ids) >= 3 for r in reqs):
        llm.engine.step()
    raised = _poison(llm, {id(reqs[0].seq)})
    _run(llm.engine)
    assert reqs[0].out.finish_reason == "error" and raised == [3, 1]
    assert [r.out.token_ids for r in reqs[1:]] == alone[1:]
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks


def test_an_innocent_scoring_request_keeps_exact_prompt_logprobs(path):
    """A scorer runs inside the pass: a pass that fails after scoring some rows is rolled back, so the
    request's prompt logprobs are those of a run alone, each position once."""
    prompts = _prompts(2)
    score = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    alone = _llm(path).generate([prompts[0]], score)[0]
    llm = _llm(path)
    good = llm.engine.add_request(prompts[0], score)
    bad = llm.engine.add_request(prompts[1], score)
    real = llm.runner.forward_groups

    def fails_late(groups):  # scores every group's rows, then fails: the worst case for a rollback
        seqs = [s for _, step, _, _ in groups for s in step.seqs]
        out = real(groups)
        if bad.seq in seqs:
            raise RuntimeError("late")
        return out
    llm.runner.forward_groups = fails_late
    _run(llm.engine)
    assert bad.out.finish_reason == "error" and good.out.finish_reason == "length"
    assert good.out.token_ids == alone.token_ids
    assert [(p.token_id, p.logprob) for p in good.out.prompt_logprobs[1:]] == \
        [(p.token_id, p.logprob) for p in alone.prompt_logprobs[1:]]
    assert llm.kv.manager.num_free == llm.kv.manager.num_blocks


def test_a_request_whose_sampling_fails_ends_alone(path):
    """An error in one request's own rows (here its sampler) ends that request in the same step; the step's
    other requests take their tokens from it as usual."""
    prompts = _prompts(3)
    alone = [o.token_ids for o in _llm(path).generate(prompts, GREEDY)]
    llm = _llm(path)
    reqs = [llm.engine.add_request(p, GREEDY) for p in prompts]
    calls = {"n": 0}

    def broken(logits):
        calls["n"] += 1
        raise ValueError("probability tensor contains inf or nan")
    reqs[1].sample = broken
    assert _run(llm.engine, ValueError) == 1
    assert calls["n"] == 1 and reqs[1].out.finish_reason == "error"
    assert [reqs[0].out.token_ids, reqs[2].out.token_ids] == [alone[0], alone[2]]
    assert llm.engine.counters.failed_passes == 0 and llm.kv.manager.num_free == llm.kv.manager.num_blocks



def test_repeated_failed_passes_make_health_503_until_a_pass_succeeds(path):
    """A broken engine (every pass raises: a weight store gone) is not a silent loop: each request ends with an
    OpenAI-shaped 500 and its blocks back, /health turns 503 after UNHEALTHY_AFTER failed passes in a row and
    is 200 again once a pass succeeds."""
    from starlette.testclient import TestClient

    from serve_helpers import settles
    from tierlm.engine.args import EngineArgs
    from tierlm.serve.loop import UNHEALTHY_AFTER
    from tierlm.serve.server import ServeArgs, engine_app, serve_engine_args

    llm = LLM.from_args(serve_engine_args(EngineArgs(model=str(path), progress=False)))
    loop, app, _ = engine_app(llm, ServeArgs(served_model_name="m"))
    real = llm.runner.forward_groups

    def gone(groups):
        raise RuntimeError("the weight store is gone")
    llm.runner.forward_groups = gone
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    loop.start()
    try:
        with TestClient(app) as client:
            assert client.get("/health").status_code == 200
            for i in range(UNHEALTHY_AFTER):
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
                assert "the weight store is gone" in r.json()["error"]["message"]
                # the loop snapshots its state right after the step that failed, the answer may come first
                want = 503 if i + 1 >= UNHEALTHY_AFTER else 200
                assert settles(lambda: client.get("/health").status_code == want), client.get("/health").json()
            assert client.get("/health").json()["status"] == "unhealthy"
            assert llm.kv.manager.num_free == llm.kv.manager.num_blocks and loop.num_unfinished == 0
            llm.runner.forward_groups = real  # the store is back: the next pass succeeds
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["text"]
            assert settles(lambda: client.get("/health").status_code == 200)
    finally:
        loop.stop()
        llm.close()
