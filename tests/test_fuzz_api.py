"""An adversarial suite (issue 23): the OpenAI endpoints fuzzed from their OpenAPI schema (schemathesis on
hypothesis) on the embedded model served in this process, plus token-id prompts, odd JSON and Unicode sent as raw
bytes. Bounded: derandomized (the same examples every run), a fixed number per endpoint, max_tokens small but a
few far past the context (a 128-token max_context makes its edge cheap to reach).

Every response is a 2xx or a 4xx in OpenAI's error shape, within its time bound, a stream read to [DONE] (in this
process a handler's exception, a 500 on a socket, reaches the test as that exception and fails it); after
each run the engine has nothing unfinished, every KV block is free, no step failed, and the greedy reference
request gives the text it gave before the fuzzing. Then the inputs issue 23 named (and those the fuzzer found)
as regression tests."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from fuzz_helpers import MODEL, REFERENCE, SMALL_TOKENS, bound, check, serve

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

MAX_CONTEXT = 128
# deadline None: the time bound is the transport's, per call (fuzz_helpers.CALL_TIMEOUT_S); health checks off:
# a case that runs the model is "slow" by hypothesis' measure, and the bodies are large by design
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                phases=(Phase.explicit, Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))
LARGE_ONE_IN = 20  # of the schema's valid cases, one in this many asks for 10^9 tokens (~100 generated)


@pytest.fixture(scope="module")
def served():
    s = serve(MAX_CONTEXT, kv_memory="8MiB", max_num_seqs=4)  # 11 blocks of 16: n=16 choices queue and preempt
    yield s
    s.close()


def _text(max_size: int = 16):
    """Any Unicode; a third of them may hold lone surrogates (hypothesis' default alphabet leaves Cs out)."""
    clean = st.text(st.characters(), max_size=max_size)
    return st.one_of(clean, clean, st.text(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)),
                                           max_size=max_size))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_from_the_schema(served, path, mode):
    """schemathesis' cases of the endpoint's request schema (positive: valid by it; negative: not)."""
    seen = Counter()

    @settings(FUZZ, max_examples=30 if mode.is_positive else 40)
    @given(case=served.op(path).as_strategy(mode), large=st.sampled_from([False] * (LARGE_ONE_IN - 1) + [True]))
    def run(case, large):
        if mode.is_positive and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # else nearly every valid case is a 404 for an unknown model
        bound(case.body, large and mode.is_positive)
        status, content, _ = served.send(case)
        check(status, content)
        seen[status] += 1

    run()
    print(f"{path} {mode}: {dict(seen)}")
    if mode.is_positive:  # the fuzzing reached the engine, not only the validation
        assert seen[200] >= sum(seen.values()) // 3, seen
    served.assert_unharmed()


@st.composite
def token_id_bodies(draw, vocab: int):
    """Completions with token-id prompts: short ones with ids outside the vocabulary (negative, huge, past
    int64) among valid ones, or valid ids up to the context's edge asking for more than the rest of it."""
    if draw(st.booleans()):
        n = draw(st.integers(MAX_CONTEXT - 3, MAX_CONTEXT + 1))
        ids = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
        max_tokens = draw(st.sampled_from([None, 0, 1, MAX_CONTEXT, 10 ** 9, 2 ** 63 - 1]))
    else:
        odd = st.sampled_from([-1, vocab, vocab + 1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30])
        ids = draw(st.lists(st.one_of(st.integers(0, vocab - 1), odd, st.integers()), max_size=12))
        max_tokens = draw(st.integers(0, SMALL_TOKENS))
    shape = draw(st.sampled_from(["ids", "one batch", "two batches"]))
    prompt = {"ids": ids, "one batch": [ids], "two batches": [ids, ids]}[shape]
    stream = draw(st.booleans())
    body = {"model": MODEL, "prompt": prompt, "stream": stream, "echo": draw(st.booleans()),
            "temperature": draw(st.sampled_from([0, 1.0]))} | ({"stream_options": {"include_usage": True}} if stream
                                                               else {})
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if draw(st.booleans()):
        body["logprobs"] = draw(st.integers(0, 5))
    return body


def test_fuzz_token_id_prompts(served):
    seen = Counter()

    # both sides of the edge explicitly, streamed and not (the drawn ones vary in what they reach)
    edge = [{"model": MODEL, "prompt": list(range(10, 10 + n)), "stream": stream, "temperature": 0,
             "max_tokens": 10 ** 9} | ({"stream_options": {"include_usage": True}} if stream else {})
            for n in (MAX_CONTEXT - 3, MAX_CONTEXT - 1, MAX_CONTEXT) for stream in (False, True)]

    @settings(FUZZ, max_examples=40)
    @given(body=token_id_bodies(served.llm.config.vocab_size))
    def run(body):
        status, content = served.post("/v1/completions", body)
        answer = check(status, content)
        seen[status] += 1
        if status == 200:
            usage = (answer[-1] if body["stream"] else answer)["usage"]
            assert usage["total_tokens"] <= MAX_CONTEXT, usage  # generation stops at the context's edge
            seen["to the edge"] += usage["total_tokens"] == MAX_CONTEXT and usage["completion_tokens"] > 0
            seen["streamed"] += body["stream"]

    for body in edge:
        run = example(body=body)(run)
    run()
    print(f"token ids: {dict(seen)}")
    assert seen[200] and seen[400] and seen["to the edge"] and seen["streamed"], seen  # each side of the edges
    served.assert_unharmed()


COST = {"max_tokens", "max_completion_tokens", "n"}  # what makes a valid request expensive: bounded apart
FIELDS = ["model", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "presence_penalty",
          "frequency_penalty", "ignore_eos", "min_tokens", "prompt_logprobs", "user", "logprobs", "top_logprobs",
          "echo", "prompt", "messages"]


def _json_values():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _text())
    return st.recursive(leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_text(4), kids, max_size=3),
                        max_leaves=10)


@st.composite
def odd_json(draw) -> tuple[str, bytes]:
    """(path, raw body): a valid body with some fields replaced by any JSON value (nested lists and objects,
    NaN and Infinity, ints past int64, lone surrogates), encoded \\u-escaped or as surrogate-passing UTF-8;
    sometimes not an object at all."""
    chat = draw(st.booleans())
    content = st.one_of(_text(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text()}),
                                          max_size=2))
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
                                     "content": content})
    body: dict = {"messages": draw(st.lists(message, min_size=1, max_size=3))} if chat else {"prompt": draw(_text())}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        body[name] = draw(_json_values())
    small = st.one_of(st.integers(-2, SMALL_TOKENS), st.floats(-2, SMALL_TOKENS), st.none(), _text(4),
                      st.lists(st.integers(), max_size=2))
    for name in draw(st.lists(st.sampled_from(sorted(COST)), max_size=2, unique=True)):
        body[name] = draw(small)
    body.setdefault("max_tokens", SMALL_TOKENS)
    value = draw(st.sampled_from([body] * 14 + [[body], draw(_json_values())]))  # sometimes not an object
    ascii_ = draw(st.booleans())
    raw = json.dumps(value, ensure_ascii=ascii_).encode("utf-8", "surrogatepass")
    return ("/v1/chat/completions" if chat else "/v1/completions"), raw


def test_fuzz_odd_json_and_unicode(served):
    seen = Counter()

    @settings(FUZZ, max_examples=60)
    @given(sent=odd_json())
    def run(sent):
        path, raw = sent
        status, content = served.post(path, raw)
        check(status, content)
        seen[status] += 1

    run()
    print(f"odd JSON: {dict(seen)}")
    assert seen[200] and seen[400], seen
    served.assert_unharmed()


def test_the_other_endpoints_answer(served):
    for path in ("/v1/models", "/health", "/metrics"):
        status, content, _ = served.send(served.op(path, "GET").Case())
        assert status == 200, (path, content[:300])
    models = json.loads(served.send(served.op("/v1/models", "GET").Case())[1])
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == MAX_CONTEXT


# --- regressions: issue 23's inputs and the fuzzer's findings (each a 400 naming the parameter, not a 500) ---
SURROGATE_UTF8 = "\ud800".encode("utf-8", "surrogatepass")
BAD = [
    ("/v1/completions", b'{"prompt": "hi", "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", b'{"prompt": "hi", "seed": -9223372036854775809}', "seed"),
    ("/v1/completions", b'{"prompt": "hi\\ud800"}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi' + SURROGATE_UTF8 + b'"}', "prompt"),
    ("/v1/completions", b'{"prompt": ["\\udc00"]}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\udc00"]}', "stop"),
    ("/v1/completions", b'{"prompt": "hi", "stop": "\\ud800"}', "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": Infinity}', "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 1e400}', "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": NaN}', "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "presence_penalty": -Infinity}', "presence_penalty"),
    ("/v1/completions", b'{"prompt": "hi", "frequency_penalty": NaN}', "frequency_penalty"),
    ("/v1/completions", b'{"prompt": "hi", "top_k": 1e300}', "top_k"),
    ("/v1/completions", b'{"prompt": [10000000]}', "prompt"),
    ("/v1/completions", b'{"prompt": [-1]}', "prompt"),
    ("/v1/completions", b'{"prompt": [18446744073709551616]}', "prompt"),
    # found by the fuzzer: an echo decoded ids before the engine checked them (OverflowError, a 500)
    ("/v1/completions", b'{"prompt": [-1], "echo": true}', "prompt"),
    ("/v1/completions", b'{"prompt": [[5, 4294967296]], "echo": true, "max_tokens": 1}', "prompt"),
    ("/v1/completions", b'{"prompt": [' + b", ".join([b"7"] * (MAX_CONTEXT + 1)) + b']}', "prompt"),
    ("/v1/completions", b'{"prompt": [' + b", ".join([b"7"] * MAX_CONTEXT) + b'], "max_tokens": 1}', "prompt"),
]


@pytest.mark.parametrize("path,raw,param", BAD, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_parameters_are_a_400_naming_them(served, path, raw, param):
    status, content = served.post(path, raw)
    body = check(status, content)
    assert status == 400 and body["error"]["param"] == param, body


def test_a_tiny_temperature_is_greedy(served):
    """temperature 1e-300 made every engine step fail (issue 23): below 1e-5 it is greedy, as vLLM's."""
    status, content = served.post("/v1/completions", {**REFERENCE, "temperature": 1e-300})
    assert status == 200 and check(status, content)["choices"][0]["text"] == served.reference
    served.assert_unharmed()


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "hi", "seed": 1' + b"0" * 5000 + b"}",
                                 b'{"prompt": "\xff"}'], ids=["deep", "long-int", "not-utf8"])
def test_unreadable_bodies_are_a_400_in_openai_shape(served, raw):
    status, content = served.post("/v1/completions", raw)
    assert status == 400
    check(status, content)


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46])
def test_a_tiny_top_p_keeps_the_most_likely_token(served, top_p):
    """top_p below fp32's smallest number compared as 0 >= 0, dropped every token and failed the request
    (found by the fuzzer on CI): the most likely token always stays, so the answer is the greedy one."""
    status, content = served.post("/v1/completions", {**REFERENCE, "temperature": 1.0, "top_p": top_p, "seed": 3})
    assert status == 200 and check(status, content)["choices"][0]["text"] == served.reference
    served.assert_unharmed()
