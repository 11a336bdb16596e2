"""GGUF tokenizer metadata -> an HF `tokenizers` backend that encodes as llama.cpp's llama-vocab.cpp does.

Three vocabulary kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE from the merges, after the split regexes of `tokenizer.ggml.pre` (pretokenizers.py).
- "llama": SentencePiece (Llama 2, Mistral, Gemma 3, Phi-3). llama.cpp's llm_tokenizer_spm merges, over and
  over, the adjacent pair whose concatenation is the highest-scoring token, then spells any character that no
  token holds as its UTF-8 bytes' `<0xNN>` tokens. That is BPE whose merges are every split of every token,
  ranked by the merged token's score (as HF's LlamaConverter builds it), with byte fallback. Spaces are `▁`;
  `add_space_prefix` puts one before each run of text that starts the input or follows a special token.
- "gemma4": BPE from the merges over raw UTF-8 (no byte-level map), spaces as `▁`, lines and newline runs as
  the only pieces, byte fallback.

Token types (llama.cpp's): control and unknown tokens are special (split out of raw text, dropped by
decode(skip_special_tokens)); user-defined ones are always split out and decode as typed.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

from tierlm.errors import ModelFormatError, UnsupportedModelError
from tierlm.weights.pretokenizers import pre_tokenizer

_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # llama.cpp's token types (1 normal, 5 unused, 6 byte)
SPACE = "\u2581"  # SentencePiece's ▁

# Tokens that end generation by their text, as llama.cpp's EOG list (llama-vocab.cpp) has them, besides the
# declared eos / eot / eom / fim pad, rep and sep ids.
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
))
# FIM tokens that end generation (llama.cpp adds them to its EOG set), found by text when no id is declared
_FIM_TEXTS = {
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
KINDS = ("gpt2", "llama", "gemma4")


def backend_from_gguf(meta: dict[str, Any]) -> HFTokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ModelFormatError("GGUF file has no tokenizer metadata (tokenizer.ggml.*)")
    tokens = token_texts(meta)
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) < len(tokens):
        raise ModelFormatError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":
        backend = _byte_level_bpe(meta, tokens)
    elif kind == "llama":
        backend = _sentencepiece(meta, tokens)
    elif kind == "gemma4":
        backend = _gemma4(meta, tokens)
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer type {kind!r} is not supported (supported: {', '.join(KINDS)})")
    _add_special(backend, tokens, types, rstrip=_phi3(meta))
    return backend


def token_texts(meta: dict[str, Any]) -> list[str]:
    # an empty token is "[EMPTY_<id>]", as llama.cpp names it (an empty string cannot be matched or merged)
    return [t or f"[EMPTY_{i}]" for i, t in enumerate(meta["tokenizer.ggml.tokens"])]


def _vocab(tokens: list[str]) -> dict[str, int]:
    # a repeated text maps to its last id, as llama.cpp's token_to_id is filled
    return {t: i for i, t in enumerate(tokens)}


def _merges(meta: dict[str, Any]) -> list[tuple[str, str]]:
    if "tokenizer.ggml.merges" not in meta:
        raise ModelFormatError("GGUF BPE tokenizer has no tokenizer.ggml.merges")
    out = []
    for m in meta["tokenizer.ggml.merges"]:
        cut = m.find(" ", 1)  # from 1, as llama.cpp: a merge's first piece may itself be a space
        if cut < 0:
            raise ModelFormatError(f"GGUF merge {m!r} has no space")
        out.append((m[:cut], m[cut + 1:]))
    return out


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    pre = pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend = HFTokenizer(models.BPE(vocab=_vocab(tokens), merges=_merges(meta), ignore_merges=pre.ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) split of every token whose halves are tokens, the best-scoring merged token's first
    (equal scores: token order, then split position). llama.cpp breaks a tie between two pairs of equal score
    by position instead; a rank cannot say that, so only tied scores of mergeable tokens could differ.
    One comprehension over every cut of every token, tokens best score first (a stable sort): already in rank
    order, no sort of the pairs; Gemma 3's 262k tokens (1.2 M cuts) in about a second."""
    vocab = set(tokens)
    order = np.argsort(-np.asarray(scores[:len(tokens)], dtype=np.float64), kind="stable").tolist()
    ranked = [tokens[i] for i in order]
    return [(t[:cut], t[cut:]) for t in ranked for cut in range(1, len(t)) if t[:cut] in vocab and t[cut:] in vocab]


def _sentencepiece(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    scores = list(meta.get("tokenizer.ggml.scores", []))
    if len(scores) < len(tokens):
        raise ModelFormatError(f"GGUF SentencePiece tokenizer has {len(tokens)} tokens but {len(scores)} scores")
    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    backend = HFTokenizer(models.BPE(vocab=_vocab(tokens), merges=spm_merges(tokens, scores),
                                     unk_token=tokens[unk] if 0 <= unk < len(tokens) else None,
                                     byte_fallback=True, fuse_unk=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's SPM default: on
    # Prepend runs on each piece of text between special tokens (HF splits those out first), which is where
    # llama.cpp adds its space: the input's start and after every special token. It skips empty pieces.
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(SPACE)] if prefix else []) + [normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _gemma4(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    # llama.cpp takes a run of newlines that is a token whole; the merges reach every such run anyway (checked
    # against a transcription of llama.cpp's loop on 20k tokens and runs of 1-39 newlines). ignore_merges
    # would not do: it also takes a line that is a token whole where the merges end elsewhere (<unusedN>).
    backend = HFTokenizer(models.BPE(vocab=_vocab(tokens), merges=_merges(meta), byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[^\\n]+|[\\n]+"), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _phi3(meta: dict[str, Any]) -> bool:
    name = str(meta.get("general.name", "")).lower()
    return "phi-3" in name or "phi3" in name


def _add_special(backend: HFTokenizer, tokens: list[str], types: list[int], rstrip: bool) -> None:
    """Control / unknown tokens as special added tokens, user-defined ones as plain added tokens. Phi-3's added
    tokens eat the whitespace after them (llama.cpp sets RSTRIP on all of them by the model's name, then takes
    it off <unk>, <s> and <|endoftext|>)."""
    def strip(t: str) -> bool:
        return rstrip and t not in ("<unk>", "<s>", "<|endoftext|>")

    backend.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=strip(t))
                                for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False, rstrip=strip(t))
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])


def add_bos(meta: dict[str, Any]) -> bool:
    """Whether encode starts with BOS: the vocabulary's add_bos_token, else llama.cpp's default for its kind
    (SentencePiece yes, BPE no); Gemma 4 always (llama.cpp overrides a false flag)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gemma4":
        return True
    return bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))


def bos_id(meta: dict[str, Any]) -> int | None:
    default = 1 if meta.get("tokenizer.ggml.model") == "llama" else None  # llama.cpp's SPM default
    return meta.get("tokenizer.ggml.bos_token_id", default)


def eos_id(meta: dict[str, Any]) -> int | None:
    default = 2 if meta.get("tokenizer.ggml.model") == "llama" else None
    return meta.get("tokenizer.ggml.eos_token_id", default)


def end_of_generation_ids(meta: dict[str, Any], tokens: list[str]) -> frozenset[int]:
    """llama.cpp's EOG set: the declared eos / eot / eom ids, the FIM pad / repo / file-separator tokens, and
    every token whose text is a known end of turn (<|im_end|>, <end_of_turn>, <|end|>, <|eot_id|>, ...). Its
    two exceptions too: <|end|> is no end beside <|return|> + <|call|> or <|calls|> + <|flush|> (harmony-style
    formats, where <|end|> closes a message mid-answer), nor </s> beside <|tool_response> (Gemma 4)."""
    index = _vocab(tokens)
    declared = [eos_id(meta), meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
    for kind, texts in _FIM_TEXTS.items():
        found = meta.get(f"tokenizer.ggml.{kind}_token_id")
        if found is None:
            found = next((index[t] for t in texts if t in index), None)
        declared.append(found)
    ids = {i for i in declared if i is not None and 0 <= i < len(tokens)}
    ids |= {index[t] for t in _EOG_TEXTS if t in index}
    present = {tokens[i]: i for i in ids}
    has_call = "<|call|>" in present or "<|calls|>" in present
    if "<|end|>" in present and has_call and ("<|return|>" in present or "<|flush|>" in present):
        ids.discard(present["<|end|>"])
    if "</s>" in present and "<|tool_response>" in present:
        ids.discard(present["</s>"])
    return frozenset(ids)
