"""Tokenizer: HF `tokenizers` built from tokenizer.json, or from GGUF metadata (gguf_vocab.py: byte-level BPE
with llama.cpp's pre-tokenizers, SentencePiece, Gemma 4's BPE).

Also renders the model's own chat template with jinja2 (sandboxed, as HF does). Special-token strings are
control tokens in raw text (encode: the caller writes the whole prompt) and plain text inside chat message
content (encode_chat, chat_text.py): only the template opens and closes turns.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from tierlm.errors import ModelFormatError, UsageError
from tierlm.weights import gguf_vocab
from tierlm.weights.chat_text import encode_pieces, holds_special, special_token_strings, split_rendering

# Tokens that end a turn in common chat formats; used in addition to the declared EOS of a tokenizer.json (a
# GGUF's end-of-generation set is llama.cpp's, gguf_vocab.end_of_generation_ids).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>")

# Used only when a model ships no template (base models): plain ChatML, or Gemma's turns where the vocabulary has
# them (Gemma 3 GGUFs of the base model carry no template; its turns are the format the vocabulary was made for).
# The Gemma one is Gemma 3's own, whitespace-free: a system message opens the first user turn, assistant is "model".
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_FALLBACK_GEMMA = (
    "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ prefix if loop.first else '' }}{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass
class Tokenizer:
    backend: HFTokenizer
    eos_token_ids: frozenset[int]
    bos_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token / eos_token strings for templates
    # id -> text of the backend's special added tokens (fixed: the backend is complete when this is built)
    _specials: dict[int, str] = field(init=False, repr=False, compare=False)
    # a copy of the backend with encode_special_tokens on, for content as text: built on first use, under the
    # lock. A copy, not a toggle: the shared backend's flag is global to every thread encoding with it.
    _plain: HFTokenizer | None = field(default=None, init=False, repr=False, compare=False)
    _plain_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._specials = special_token_strings(self.backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Raw text (a completions prompt): special-token strings in it are control tokens, as in HF's
        tokenizer(text), vLLM's and llama.cpp's completions; there is no template turn in it to fake."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UsageError("chat messages must be dicts with 'role' and 'content'")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            template = env.from_string(self.chat_template or self._fallback_template())
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens)
        except jinja2.TemplateError as e:
            raise UsageError(f"chat template failed: {e}") from None

    def _fallback_template(self) -> str:
        gemma = all(self.backend.token_to_id(t) is not None for t in ("<start_of_turn>", "<end_of_turn>"))
        return _FALLBACK_GEMMA if gemma else _FALLBACK_TEMPLATE

    def encode_chat(self, messages: list[dict[str, str]], allow_special_tokens_in_content: bool = False) -> list[int]:
        """Ids of the rendered conversation (which carries BOS when the model wants one). A special-token
        string inside a message's content is plain text unless allow_special_tokens_in_content (trusted
        callers); a conversation without one is the whole-string encode it always was. UsageError when a
        content holding one cannot be located in the template's rendering (chat_text.split_rendering)."""
        text = self.apply_chat_template(messages)
        specials = [] if allow_special_tokens_in_content else list(self._specials.values())
        flagged = [i for i, m in enumerate(messages) if holds_special(m["content"], specials, self.backend)]
        if not flagged:
            return self.backend.encode(text, add_special_tokens=False).ids
        pieces = split_rendering(self.apply_chat_template, messages, text, flagged)
        return encode_pieces(pieces, self.backend, self._plain_backend(), self._specials)

    def _plain_backend(self) -> HFTokenizer:
        with self._plain_lock:
            if self._plain is None:
                plain = HFTokenizer.from_str(self.backend.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _end_ids(backend: HFTokenizer, declared: list[int]) -> frozenset[int]:
    ids = set(declared)
    for tok in _END_OF_TURN:
        if (i := backend.token_to_id(tok)) is not None:
            ids.add(i)
    return frozenset(ids)


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """The GGUF's own vocabulary, encoding as llama.cpp does (the tokenizer suite's test checks it); works on a
    vocabulary-only file's metadata too."""
    backend = gguf_vocab.backend_from_gguf(meta)
    tokens = gguf_vocab.token_texts(meta)
    bos, eos = gguf_vocab.bos_id(meta), gguf_vocab.eos_id(meta)
    bos = bos if bos is not None and 0 <= bos < len(tokens) else None
    eos = eos if eos is not None and 0 <= eos < len(tokens) else None
    return Tokenizer(
        backend=backend,
        eos_token_ids=gguf_vocab.end_of_generation_ids(meta, tokens),
        bos_token_id=bos,
        add_bos=gguf_vocab.add_bos(meta),
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens={"bos_token": tokens[bos] if bos is not None else "",
                        "eos_token": tokens[eos] if eos is not None else ""},
    )


def _token_str(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def tokenizer_from_hf_dir(path: Path) -> Tokenizer:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelFormatError(f"{path}: no tokenizer.json")
    try:
        backend = HFTokenizer.from_file(str(tok_file))
        cfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() else {}
        gen = json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").is_file() else {}
    except Exception as e:  # tokenizers raises a plain Exception on a malformed file
        raise ModelFormatError(f"{tok_file}: cannot read tokenizer ({e})") from None
    # BOS is added by us, not by the file's post-processor, so every path encodes the same way.
    bos_str, eos_str = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
    bos_id = backend.token_to_id(bos_str) if bos_str else None
    add_bos = bool(cfg.get("add_bos_token", False)) or _post_processor_adds(backend, bos_id)
    declared = gen.get("eos_token_id", [])
    declared = declared if isinstance(declared, list) else [declared]
    if eos_str and (e := backend.token_to_id(eos_str)) is not None:
        declared.append(e)
    template = cfg.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    return Tokenizer(backend=backend, eos_token_ids=_end_ids(backend, declared), bos_token_id=bos_id,
                     add_bos=add_bos, chat_template=template,
                     special_tokens={"bos_token": bos_str, "eos_token": eos_str})


def _post_processor_adds(backend: HFTokenizer, bos_id: int | None) -> bool:
    if bos_id is None:
        return False
    return backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
