"""Shared fixtures: tiny random Hugging Face models (Llama / Qwen2 / Mistral variants) saved as safetensors
directories with a small byte-level BPE tokenizer, built once per session. No hub access.

Every parameter is re-randomised (norm weights and biases too, not HF's ones/zeros init) and the weight
scale is raised above HF's std-0.02 init so attention patterns and logits are far from uniform: a bug in
rope, masking, GQA, biases or norms moves the logits by much more than the test tolerances.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

VOCAB = 512
MAX_POS = 256
BOS, EOS = "<s>", "</s>"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny language model is still a language model, only smaller.",
    "Rotary position embeddings rotate query and key vectors by an angle that grows with position.",
    "Grouped query attention shares each key and value head between several query heads.",
    "Quantisation stores weights in blocks of thirty-two values with one scale per block.",
    "Hello, world! How are you today? I am fine, thank you very much.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Sliding window attention lets each token see only the most recent tokens.",
    "It's a test: don't worry, we'll check the logits, they're close.",
    "Numbers like 12, 345 and 6789 appear in text too.",
    "The cache stores keys and values so that decoding one token does not recompute the prompt.",
    "Weights, norms and biases are randomised so that the comparison is strong.",
] * 4


@dataclass
class TinyModel:
    name: str
    path: Path  # HF directory: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    hf: torch.nn.Module  # the HF model, fp32, eval mode, weights identical to the files


def _hf_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    return {
        # (a) Llama 3 style: untied head, llama3 rope scaling (short original context so all three
        #     frequency bands -- unscaled, smoothed, scaled -- occur for head_dim 16)
        "llama3_rope": LlamaConfig(
            **common, num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        # (b) Qwen2: q/k/v biases, GQA
        "qwen2": Qwen2Config(**common, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        # (c) Llama with GQA and tied embeddings (SmolLM2-like), 3 layers
        "llama_gqa_tied": LlamaConfig(**common, num_hidden_layers=3, num_key_value_heads=2, tie_word_embeddings=True),
        # (d) Mistral, window larger than any test sequence (same results with or without the window)
        "mistral": MistralConfig(**common, num_hidden_layers=2, num_key_value_heads=2, sliding_window=MAX_POS,
                                 tie_word_embeddings=False),
        # (e) Mistral with a window (8) much shorter than the test sequences: the window mask is exercised
        #     in prefill, chunked prefill and decode. Safetensors only (llama.cpp's GGUF has no window).
        "mistral_swa": MistralConfig(**common, num_hidden_layers=2, num_key_value_heads=2, sliding_window=8,
                                     tie_word_embeddings=False),
    }


TINY_NAMES = list(_hf_configs().keys())


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if p.ndim == 1 and "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # U(0.5, 1.5)
            elif p.ndim == 1:  # biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)


def build_tokenizer(out_dir: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE (GPT-2 style) trained on a few sentences: tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "add_bos_token": False,
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_POS}))


def _build(name: str, root: Path, seed: int) -> TinyModel:
    from transformers import AutoModelForCausalLM

    cfg = _hf_configs()[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    _randomise(model, seed)
    model.eval()
    model.generation_config.eos_token_id = None  # greedy runs always produce max_new_tokens
    model.generation_config.pad_token_id = 0
    path = root / name
    model.save_pretrained(path)
    build_tokenizer(path)
    return TinyModel(name=name, path=path, hf=model)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    """name -> TinyModel, built lazily and cached for the session."""
    root = tmp_path_factory.mktemp("tiny_models")

    class _Lazy(dict):
        def __missing__(self, key: str) -> TinyModel:
            self[key] = _build(key, root, seed=1234 + TINY_NAMES.index(key))
            return self[key]

    return _Lazy()


@pytest.fixture(scope="session", params=TINY_NAMES)
def tiny(request, tiny_models) -> TinyModel:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free 127.0.0.1 port (maxmemory 256mb, allkeys-lru) for the session; stopped after."""
    from redis_server import RedisServer
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """The session's server, emptied for this test."""
    import redis
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url
