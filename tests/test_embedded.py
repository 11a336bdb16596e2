"""The embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF) against transformers loading the same file.

transformers dequantises the GGUF with its own code path and runs its own Llama; tierlm must agree to 1e-3
on fp32 logits and exactly on greedy tokens. Takes ~30 s on 2 CPU cores (most of it transformers' GGUF load).
"""
from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.weights.embedded import embedded_model_path

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 32
# No digits: transformers' GGUF tokenizer has no "smollm" pre-tokenizer (digits split one by one).
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,   runs of spaces\tand a tab\n\nand blank lines\n",
    "It's, we'll, they're, I'd: contractions!",
    "naïve café, Ünïcödé ☃ and emoji 🙂",
    "def f(x):\n    return x * x  # code",
    "<|im_start|>user\nHi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def gguf_path():
    return embedded_model_path()


@pytest.fixture(scope="module")
def llm():
    return LLM(None, dtype="float32", quant="none")


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # the oracle never stops early
    return model


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_embedded_config(llm):
    cfg = llm.config
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    assert llm.source.meta["tokenizer.ggml.pre"] == "smollm"
    assert "Q4_1" in llm.source.storage_types()


@pytest.mark.slow
def test_chat_logits_match_transformers(llm, hf_model):
    ids = llm.tokenizer.encode_chat(MESSAGES)
    ours = llm.prompt_logits(ids).unsqueeze(0)  # [1, T, V], through the engine
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([ids]), use_cache=False).logits.float()
    assert ours.shape == ref.shape == (1, len(ids), 49152)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-3, f"max |logit diff| {diff:.2e}"


@pytest.mark.slow
def test_greedy_matches_transformers(llm, hf_model):
    ids = llm.tokenizer.encode_chat(MESSAGES)
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))[0]
    with torch.no_grad():
        gen = hf_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=2)
    ref = gen[0, len(ids):].tolist()
    assert len(ref) == NEW_TOKENS and len(out.token_ids) == NEW_TOKENS
    assert out.token_ids == ref


def test_chat_answers_paris(llm):
    out = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its turn; EOS is not part of the output
    assert not set(out.token_ids) & llm.tokenizer.eos_token_ids


@pytest.mark.slow
def test_chat_template_matches_transformers(llm, hf_tokenizer):
    ref = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ref = ref if isinstance(ref, list) else list(ref["input_ids"])
    assert llm.tokenizer.encode_chat(MESSAGES) == ref


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(llm, hf_tokenizer, text):
    ids = llm.tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert llm.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split(llm):
    ids = llm.tokenizer.encode("2024")
    assert len(ids) == 4
    assert [llm.tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]
    text = "In 2024, 1234567 people paid 3.14 each."
    assert llm.tokenizer.decode(llm.tokenizer.encode(text)) == text
