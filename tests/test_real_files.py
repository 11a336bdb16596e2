"""The real GGUF files people download (issue 24), run as `tierlm generate --model it.gguf` runs them: a greedy
chat answer that is right, and the same tokens alone, in a batch, prefilled in small chunks and streamed from
an offload store under a budget. The files come from tests/fetch_real.py (`make test` fetches them); without
them these tests skip and say so."""
from __future__ import annotations

from pathlib import Path

import pytest
from fetch_real import FILES
from helpers import chunked_engine

from tierlm import LLM, SamplingParams
from tierlm.eval_ppl import perplexity
from tierlm.weights.embedded import embedded_model_path

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
BASE_PROMPT = "The Eiffel Tower is in the city of"
OTHERS = ["def fibonacci(n):", "The three primary colours are", "1, 2, 3, 4,"]


TEXT = Path(__file__).parent / "data" / "english.txt"
# llama.cpp's figure on the same file: `llama-perplexity -m F -f tests/data/english.txt -c 512 -b 512 -t 2
# --chunks N` (llama.cpp as vendored by llama-cpp-python 0.3.36, built as BENCHMARKS.md says; Intel Xeon,
# AVX-512), as (N, ppl): the whole text's 3 windows for the embedded model, the first window (255 tokens scored,
# to keep the suite short) for the real files. The anchor is llama.cpp's number, not ours: tierlm's is computed
# here, in the same scheme (eval_ppl.py).
LLAMA_CPP_PPL = {"SmolLM2-135M-Instruct.Q4_1": (3, 22.5694), "gemma-3-270m-q4_k_m": (1, 7.4794),
                 "qwen2.5-coder-0.5b-instruct": (1, 49.2045)}


def _file(name: str):
    f = next(f for f in FILES if f.name == name)
    if not f.path.exists():
        pytest.skip(f"{f.path} is missing: `make real-files` (python tests/fetch_real.py) fetches it")
    return f.path


@pytest.fixture(scope="module", params=[f.name for f in FILES])
def real(request):
    path = _file(request.param)
    with LLM(str(path), progress=False, max_context=512) as llm:
        yield path, llm


def _answer(llm: LLM) -> tuple[list[int], str]:
    """The model's greedy answer: to the chat question where the file has a chat template (an instruct model),
    else (a base model: Gemma 3 270M) the completion of a sentence whose next word is the answer."""
    ids = llm.encode_chat(QUESTION) if llm.tokenizer.chat_template else llm.tokenizer.encode(BASE_PROMPT)
    out = llm.generate([ids], GREEDY)[0]
    return out.token_ids, out.text


def test_a_real_file_answers(real):
    _, llm = real
    _, text = _answer(llm)
    assert "paris" in text.lower(), text


def test_alone_batched_and_chunked_runs_give_the_same_tokens(real):
    _, llm = real
    prompts = [llm.encode_chat(QUESTION), llm.tokenizer.encode(BASE_PROMPT)] + [llm.tokenizer.encode(p) for p in OTHERS]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone
    engine = chunked_engine(llm, 8)
    reqs = [engine.add_request(p, GREEDY) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    assert [r.out.token_ids for r in reqs] == alone


def test_streamed_under_a_budget_gives_the_same_tokens(real, tmp_path):
    """A budget below the file's bytes: layers stream from the offload store through the ring (85%: Gemma 3's
    tied 262k-row head is 70% of its file and stays resident)."""
    path, llm = real
    resident, _ = _answer(llm)
    budget = int(path.stat().st_size * 0.85) + (32 << 20)
    with LLM(str(path), progress=False, max_context=512, max_memory={"cpu": budget},
             offload_dir=tmp_path / "off") as streamed:
        assert streamed.plan is not None and any(t.value == "disk" for t in streamed.plan.layer_tiers)
        assert _answer(streamed)[0] == resident


@pytest.mark.parametrize("name", list(LLAMA_CPP_PPL))
def test_perplexity_within_one_percent_of_llama_cpp(name):
    """What generate runs by default (the file's own blocks), scored as llama-perplexity -c 512 --chunks N
    scores the text: the second half of each of its first N windows of 512 tokens, from BOS."""
    chunks, anchor = LLAMA_CPP_PPL[name]
    path = embedded_model_path() if name.startswith("SmolLM2") else _file(name)
    with LLM(str(path), progress=False, max_context=512) as llm:
        ids = llm.tokenizer.encode(TEXT.read_text())[:chunks * 512]
        got = perplexity(llm, ids, 512, 512, "auto", progress=False, scheme="llama.cpp")
    print(f"{name}: tierlm {got.ppl:.4f}, llama.cpp {anchor:.4f} ({got.ppl / anchor:.4f}x)")
    assert got.tokens == chunks * 255 and got.ppl <= 1.01 * anchor
