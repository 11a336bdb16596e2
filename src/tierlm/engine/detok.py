"""Incremental detokenisation with stop strings: each new token costs a decode of a few tokens, not of the
whole output (the old batch path re-decoded everything each token: quadratic in the output length).

Byte-level BPE can split one character across tokens, and a token's text can depend on its left neighbour,
so a new token's text is read as decode(ids[prefix:]) minus decode(ids[prefix:read]) (vLLM's
detokenize_incrementally): `prefix` trails `read` by a few tokens of context. While that ends in an
incomplete character (U+FFFD) nothing is emitted. A delta is also held back while the text could be the
start of a stop string, so what is streamed is always a prefix of the final text.
"""
from __future__ import annotations

from tierlm.weights.tokenizer import Tokenizer

CONTEXT_TOKENS = 6  # left context re-decoded with each new token


def find_stop(text: str, stops: list[str]) -> int:
    """Index where the earliest stop string begins, or -1."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could begin a stop string (they wait for the next token)."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


class IncrementalDetokenizer:
    """Text of the generated ids so far. Invariant: `text` == tokenizer.decode(ids) up to the last complete
    character, cut at the first stop string once one is found."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already streamed
        self.stopped = False  # a stop string was found: `text` ends before it
        self._prefix = self._read = 0
        self._scan_from = 0  # stop strings cannot start before this character (already scanned)

    def add(self, token: int) -> str:
        """Append one token; returns the text that may be streamed now (possibly ""). After a stop string,
        nothing more is added (the request is over)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        if after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the bytes that finish it
        self.text += after[len(before):]
        self._prefix, self._read = max(self._read - CONTEXT_TOKENS, 0), len(self.ids)
        if self.stops:
            longest = max(len(s) for s in self.stops)
            start = max(self._scan_from - longest + 1, 0)
            cut = find_stop(self.text[start:], self.stops)
            if cut >= 0:
                self.text, self.stopped = self.text[:start + cut], True
                return self.flush()
            self._scan_from = len(self.text)
        safe = len(self.text) - _held_back(self.text, self.stops)
        if safe <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted:safe], safe
        return delta

    def flush(self) -> str:
        """At the end of the request: whatever was held back (a partial stop string that never completed, an
        incomplete last character, decoded as the replacement character as a full decode would)."""
        if not self.stopped and self._read < len(self.ids):
            decode = self.tokenizer.decode
            self.text += decode(self.ids[self._prefix:])[len(decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta
