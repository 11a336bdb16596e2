"""llama.cpp's tokenizer suite (tests/test-tokenizer-0.cpp over models/ggml-vocab-*.gguf) as a test: every decoder
vocabulary encodes each input to exactly the ids llama.cpp's .out file holds. As test-tokenizer-0 does: no BOS
(add_special false) and the text as it is (no special-token strings in these inputs). The real GGUF files'
tokenizers too: Qwen2.5's holds the qwen2 suite vocabulary, Gemma 3's SentencePiece vocabulary is checked
against a transcription of llama.cpp's llm_tokenizer_spm_session below.
"""
from __future__ import annotations

import functools
import heapq
from pathlib import Path

import pytest
from fetch_real import FILES, real_dir, vocab_dir

from tierlm.engine.detok import IncrementalDetokenizer
from tierlm.errors import UnsupportedModelError
from tierlm.weights.gguf_file import GGUFFile
from tierlm.weights.pretokenizers import PRE_TOKENIZERS
from tierlm.weights.tokenizer import Tokenizer, tokenizer_from_gguf

SEP = "\n__ggml_vocab_test__\n"
ENCODERS = ("bert", "t5")  # WPM / UGM vocabularies of encoder models (bert-bge, nomic-bert-moe): not decoders


def _suite_names() -> list[str]:
    found = sorted(p.name[len("ggml-vocab-"):-len(".gguf.inp")] for p in vocab_dir().glob("ggml-vocab-*.gguf.inp"))
    return [n for n in found if (vocab_dir() / f"ggml-vocab-{n}.gguf.out").is_file()]


def _cases(name: str) -> list[tuple[str, list[int]]]:
    """test-tokenizer-0.cpp's read_tests: inputs split at SEP (none after a final one), one .out line each."""
    base = vocab_dir() / f"ggml-vocab-{name}.gguf"
    with open(f"{base}.inp", encoding="utf-8", newline="") as f:  # newline="": "\r\n" inputs stay as written
        raw = f.read()
    inputs = raw.split(SEP)
    if raw.endswith(SEP):
        inputs.pop()
    with open(f"{base}.out", encoding="utf-8", newline="") as f:
        outs = f.read().split("\n")
    if outs and outs[-1] == "":
        outs.pop()
    assert len(inputs) == len(outs), f"{name}: {len(inputs)} inputs but {len(outs)} expected lines"
    return [(s, [int(x) for x in o.split()]) for s, o in zip(inputs, outs)]


def _meta(path: Path) -> dict:
    f = GGUFFile(path)
    try:
        return f.metadata
    finally:
        f.close()


NAMES = _suite_names()


@pytest.mark.parametrize("name", NAMES or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"llama.cpp's tokenizer suite is not in {vocab_dir()} (python tests/fetch_real.py fetches it)"))])
def test_llama_cpp_tokenizer_suite(name):
    tok = _suite_tokenizer(name)
    cases = _cases(name)
    wrong = [(s, want, got) for s, want in cases if (got := tok.encode(s, add_special_tokens=False)) != want]
    assert not wrong, f"{name}: {len(wrong)} of {len(cases)} inputs differ from llama.cpp, first: {wrong[0]}"
    # test-tokenizer-1's round trip, on these inputs: the ids spell the text back
    broken = [s for s, want in cases if tok.decode(want, skip_special_tokens=False) != s]
    assert not broken, f"{name}: decode(encode(x)) != x for {broken[:3]}"


def _round_trips(tok: Tokenizer, texts: list[str], skip_special: bool) -> list[str]:
    back = tok.backend.decode_batch([e.ids for e in tok.backend.encode_batch(texts, add_special_tokens=False)],
                                    skip_special_tokens=skip_special)
    return [s for s, b in zip(texts, back) if s != b]


def test_every_llama_spm_token_round_trips():
    """test-tokenizer-1-spm's first half (llama.cpp runs it on llama-spm): each token's text (special tokens
    spelled out) encodes, with special tokens parsed, to ids that decode to that text."""
    tok = _suite_tokenizer("llama-spm")
    texts = tok.backend.decode_batch([[i] for i in range(tok.vocab_size)], skip_special_tokens=False)
    assert not (bad := _round_trips(tok, texts, skip_special=False)), bad[:5]


@pytest.mark.slow
def test_every_code_point_round_trips_through_llama_spm():
    """test-tokenizer-1-spm's second half: every code point but surrogates, the unassigned planes 4-14 and ▁."""
    tok = _suite_tokenizer("llama-spm")
    texts = [chr(c) for c in range(0x110000) if not (0xD800 <= c <= 0xDFFF or 0x40000 <= c <= 0xE0000) and c != 0x2581]
    assert not (bad := _round_trips(tok, texts, skip_special=True)), [hex(ord(s)) for s in bad[:5]]


def _suite_tokenizer(name: str) -> Tokenizer:
    path = vocab_dir() / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing (python tests/fetch_real.py fetches it)")
    meta = _meta(path)
    if meta["tokenizer.ggml.model"] in ENCODERS:
        pytest.skip(f"{name}: an encoder's {meta['tokenizer.ggml.model']} vocabulary (tierlm runs decoders)")
    return _built(path)


@functools.cache  # each vocabulary is built once for the module's tests (Gemma 4's 262k tokens: about a second)
def _built(path: Path) -> Tokenizer:
    return tokenizer_from_gguf(_meta(path))


@pytest.mark.parametrize("name, bos, add_bos, ends", [
    ("llama-spm", 1, True, {"</s>"}),
    ("phi-3", 1, True, {"<|endoftext|>", "<|end|>", "</s>"}),
    ("gemma-4", 2, True, {"<eos>", "<turn|>", "<|tool_response>"}),
    # Qwen2's vocabulary spells "</s>" as a plain token (128247); llama.cpp's list takes it by its text
    ("qwen2", 151643, False, {"<|endoftext|>", "<|im_end|>", "</s>"}),
    ("llama-bpe", 128000, False, {"<|end_of_text|>", "<|eot_id|>"}),  # Llama 3.0: no <|eom_id|> yet
])
def test_bos_and_end_of_generation_follow_the_vocabulary(name, bos, add_bos, ends):
    tok = _suite_tokenizer(name)
    assert (tok.bos_token_id, tok.add_bos) == (bos, add_bos)
    assert tok.encode("Hello")[:1] == ([bos] if add_bos else tok.encode("Hello", add_special_tokens=False)[:1])
    assert {tok.backend.id_to_token(i) for i in tok.eos_token_ids} == ends


@pytest.mark.parametrize("name", ["llama-spm", "gemma-4"])
def test_streamed_text_is_the_decoded_text(name):
    """The engine's incremental detokenizer over ▁ pieces, byte-fallback <0xNN> tokens (the emoji and the
    Khmer are spelled in bytes by llama-spm) and SentencePiece's stripped leading space."""
    tok = _suite_tokenizer(name)
    text = " Hello  world 🦙.cpp\n\tកាន់តែពិសេស 3333 😶‍🌫️ end"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    assert streamed == tok.decode(ids) == text


def test_phi3_special_tokens_eat_the_whitespace_after_them():
    tok = _suite_tokenizer("phi-3")  # llama.cpp: RSTRIP on Phi-3's special tokens, found by the model's name
    assert tok.encode("<|user|>\nHi", add_special_tokens=False) == tok.encode("<|user|>Hi", add_special_tokens=False)
    assert tok.encode("<|user|>", add_special_tokens=False) == [32010]
    assert tok.encode("</s> \n x", add_special_tokens=False) == tok.encode("</s>x", add_special_tokens=False)
    assert tok.encode("<s> x", add_special_tokens=False) != tok.encode("<s>x", add_special_tokens=False)  # not <s>


def test_unknown_pre_tokenizer_and_vocabulary_kind_name_what_is_supported():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": [],
            "tokenizer.ggml.pre": "no-such-pre"}
    with pytest.raises(UnsupportedModelError, match="'no-such-pre' is not supported.*qwen35"):
        tokenizer_from_gguf(meta)
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported.*llama"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "bert"})
    assert {"gpt-2", "llama-bpe", "qwen2", "qwen35", "deepseek-llm", "deepseek-coder", "starcoder", "falcon", "mpt",
            "refact", "command-r", "smollm"} <= set(PRE_TOKENIZERS)


def _real(name: str) -> dict:
    f = next(f for f in FILES if f.name == name)
    if not f.path.is_file():
        pytest.skip(f"{f.path} is missing (python tests/fetch_real.py fetches it into {real_dir()})")
    return _meta(f.path)


def test_real_qwen_file_encodes_the_qwen2_suite():
    meta = _real("qwen2.5-coder-0.5b-instruct")
    if "qwen2" not in NAMES:
        pytest.skip("llama.cpp's qwen2 suite vocabulary is missing")
    tok = tokenizer_from_gguf(meta)  # the same tokens and merges, plus Qwen2.5's added tokens
    for s, want in _cases("qwen2"):
        assert tok.encode(s, add_special_tokens=False) == want, s
    assert {tok.backend.id_to_token(i) for i in tok.eos_token_ids} >= {"<|im_end|>", "<|endoftext|>"}
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text


def _spm_llama_cpp(text: str, vocab: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's llm_tokenizer_spm_session::tokenize on one run of text (spaces already ▁): merge the adjacent
    pair whose concatenation is the best-scoring token (ties: leftmost) until none is a token; a symbol that is
    no token is spelled as its bytes' <0xNN> tokens."""
    sym = list(text)
    nxt, prev = list(range(1, len(sym))) + [-1], list(range(-1, len(sym) - 1))
    queue: list[tuple[float, int, int, int]] = []

    def bigram(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and (t := sym[left] + sym[right]) in vocab:
            heapq.heappush(queue, (-scores[vocab[t]], left, right, len(t)))

    for i in range(1, len(sym)):
        bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
            continue  # stale: one side was merged since
        sym[left], sym[right] = sym[left] + sym[right], ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        bigram(prev[left], left)
        bigram(left, nxt[left])
    out, i = [], 0 if sym else -1
    while i != -1:
        out += [vocab[sym[i]]] if sym[i] in vocab else [vocab[f"<0x{b:02X}>"] for b in sym[i].encode()]
        i = nxt[i]
    return out


def _spm_reference(text: str, meta: dict) -> list[int]:
    """llama.cpp's SPM tokenize with add_special and parse_special off: user-defined tokens (longest first) are
    cut out of the raw text, each other run gets ▁ for spaces (and a leading one after a token, if
    add_space_prefix) and goes through the merge loop."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    pieces: list[tuple[bool, str]] = [(False, text)]
    for special in sorted((t for t, ty in zip(tokens, types) if ty == 4), key=len, reverse=True):
        split: list[tuple[bool, str]] = []
        for is_token, s in pieces:
            parts = [s] if is_token else s.split(special)
            for k, part in enumerate(parts):
                split += [(is_token, part)] if part else []
                split += [(True, special)] if not is_token and k < len(parts) - 1 else []
        pieces = split
    prefix, after_token, out = meta.get("tokenizer.ggml.add_space_prefix", True), True, []
    for is_token, s in pieces:
        if is_token:
            out.append(vocab[s])
        else:
            out += _spm_llama_cpp(((" " if prefix and after_token else "") + s).replace(" ", "\u2581"), vocab,
                                  meta["tokenizer.ggml.scores"])
        after_token = is_token
    return out


@pytest.fixture(scope="module")
def gemma3():
    meta = _real("gemma-3-270m-q4_k_m")
    return meta, tokenizer_from_gguf(meta)


TEXTS = ["Hello world", " Hello  world!", "def f(x):\n    return x**2  # square\n\n\n", "   leading, trailing   ",
         "нещо на Български", "日本語のテキストです。", "🦙 llama.cpp 3333333 w048 ẞ ꙮ 𝔘𝔫𝔦", "aaaaaaaaaaaaaaaaaaaaa"]


def test_real_gemma3_file_encodes_as_llama_cpp_spm(gemma3):
    meta, tok = gemma3
    assert meta["tokenizer.ggml.model"] == "llama"
    for s in TEXTS:
        assert tok.encode(s, add_special_tokens=False) == _spm_reference(s, meta), s
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("Hi")[0] == tok.bos_token_id == 2 and tok.add_bos


def test_real_gemma3_chat_template_and_end_of_turn(gemma3):
    _, tok = gemma3
    assert {tok.backend.id_to_token(i) for i in tok.eos_token_ids} >= {"<eos>", "<end_of_turn>"}
    # this base model's file has no template: Gemma's turns, as its vocabulary has them (not ChatML)
    assert tok.chat_template is None
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello."
                    "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode_chat([{"role": "user", "content": "Hi there"}])
    assert ids[:2] == [2, tok.backend.token_to_id("<start_of_turn>")] and ids.count(2) == 1
