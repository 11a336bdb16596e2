"""Tokenizer: HF `tokenizers` built from tokenizer.json, or from GGUF metadata (gpt2-style byte-level BPE).

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
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from tierlm.errors import ModelFormatError, UnsupportedModelError, UsageError
from tierlm.weights.chat_text import encode_pieces, holds_special, special_token_strings, split_rendering

# Split regexes by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp applies them before byte-level BPE.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# smollm: every digit on its own, then the GPT-2 split (the HF tokenizer.json: Digits + ByteLevel).
_PRE_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT], "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}
# Tokens that end a turn in common chat formats; used in addition to the declared EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# Used only when a model ships no template (base models): plain ChatML.
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
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
            template = env.from_string(self.chat_template or _FALLBACK_TEMPLATE)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens)
        except jinja2.TemplateError as e:
            raise UsageError(f"chat template failed: {e}") from None

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
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ModelFormatError("GGUF file has no tokenizer metadata (tokenizer.ggml.*)")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer type {kind!r} is not supported (supported: gpt2-style byte-level BPE)"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported")
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     ignore_merges=pre in ("llama3", "llama-v3", "llama-bpe")))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return Tokenizer(
        backend=backend,
        eos_token_ids=_end_ids(backend, [eos] if eos is not None else []),
        bos_token_id=bos,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
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
