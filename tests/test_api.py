"""The Python API on the embedded model: prompts as text or ids, stop strings, seeds, streaming, chat."""
from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams, UsageError


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(progress=False)


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_text_and_ids_prompts_agree(llm):
    text = "The capital of France is"
    a = llm.generate(text, GREEDY)[0]
    b = llm.generate([llm.tokenizer.encode(text)], GREEDY)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert a.finish_reason == "length"
    assert a.text == llm.tokenizer.decode(a.token_ids)
    assert a.prompt == text and b.prompt is None


def test_many_prompts_equal_one_by_one(llm):
    prompts = ["One two three", "Paris is"]
    together = llm.generate(prompts, GREEDY)
    alone = [llm.generate(p, GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_stream_deltas_concatenate_to_text(llm):
    out = llm.generate("Write a short poem about the sea.", SamplingParams(temperature=0.0, max_tokens=24))[0]
    deltas = list(llm.stream("Write a short poem about the sea.", SamplingParams(temperature=0.0, max_tokens=24)))
    assert "".join(deltas) == out.text


def test_stop_string_cuts_text(llm):
    full = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert " 5" in full.text, full.text  # premise: the model keeps counting
    cut = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=16, stop=[" 5"]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(" 5")]
    streamed = "".join(llm.stream("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=16, stop=[" 5"])))
    assert streamed == cut.text


def test_eos_stops_generation(llm):
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0.0, max_tokens=64))
    assert out.finish_reason == "stop"
    assert not set(out.token_ids) & llm.tokenizer.eos_token_ids


def test_seed_reproducible_and_seeds_differ(llm):
    p = lambda seed: SamplingParams(temperature=1.0, max_tokens=16, seed=seed, ignore_eos=True)
    a, b, c = (llm.generate("Once upon a time", p(s))[0].token_ids for s in (1, 1, 2))
    assert a == b and a != c


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate("The sky is", GREEDY)[0].token_ids
    topk1 = llm.generate("The sky is", SamplingParams(temperature=0.7, top_k=1, max_tokens=12, ignore_eos=True,
                                                     seed=3))[0].token_ids
    assert greedy == topk1


def test_chat_many_conversations(llm):
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "What is 2+2?"}]]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outs = llm.chat(convs, params)
    assert [o.text for o in outs] == [llm.chat(c, params).text for c in convs]  # together as alone
    assert "Paris" in outs[0].text and "4" in outs[1].text


def test_bad_prompt_values(llm):
    with pytest.raises(UsageError):
        llm.generate([[llm.config.vocab_size + 5]], GREEDY)
    with pytest.raises(UsageError):
        llm.generate([[]], GREEDY)
    with pytest.raises(UsageError):
        SamplingParams(top_p=0.0)


def test_tokenizer_round_trip(llm):
    text = "Hello, world! Ünïcödé and emoji 🚀 and numbers 12345."
    assert llm.tokenizer.decode(llm.tokenizer.encode(text)) == text
