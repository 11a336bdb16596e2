"""Prefix affinity with bounded load: which replica should serve a prompt. Pure functions, no Ray.

A prompt's routing key is a hash of its leading KV blocks (the chat-templated, tokenized prompt cut at the
engine's block size, at most KEY_TOKENS tokens): two prompts with equal keys share at least those blocks, so
the replica that computed them for one can serve them from its prefix cache to the other. Keys map to
replicas by consistent hashing (a ring of VNODES points per replica), so a replica joining or leaving moves
only its share of keys. Load is bounded as in Mirrokni, Thorup & Zadimoghaddam, "Consistent Hashing with
Bounded Loads" (2017): no replica takes a request while it holds ceil(c * (total + 1) / n) of them, so one
hot prefix spills onto the next replicas on the ring instead of queueing on one.

KEY_TOKENS cuts the key short because the longer the key, the fewer prompts share it: 64 tokens (4 blocks of
16) cover a chat template and its system prompt plus the start of the first message, so conversations and
documents keep their replica while prompts that share only the template (SmolLM2's default system prompt is
21 tokens) still spread.
"""
from __future__ import annotations

import bisect
import hashlib
import math
from array import array
from collections.abc import Mapping, Sequence

KEY_TOKENS = 64
# ring points per replica (ketama's number): a replica's share of keys is within 4-12% of 1/n at the median and
# 20% at the 95th percentile of random replica ids, n = 2..8 (64 points: up to 30-40%)
VNODES = 160
LOAD_FACTOR = 1.25  # c: a replica takes at most 25% more than the average of in-flight requests (+ this one)


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def prefix_key(ids: Sequence[int], block_size: int, key_tokens: int = KEY_TOKENS) -> int | None:
    """Hash of the prompt's first full blocks (at most key_tokens tokens); None when it has no full block (no
    KV it could share, so any replica serves it as well as another)."""
    n = min(len(ids) // block_size, max(1, key_tokens // block_size)) * block_size
    return _hash64(array("q", ids[:n]).tobytes()) if n else None


def prompt_ids(path: str, body: bytes, tokenizer, allow_special_tokens_in_content: bool = False) -> list[int] | None:
    """The token ids the engine will see for a request to `path`, as the app computes them (app.py; the flag
    is the replicas' EngineArgs'), or None for anything that is not a well-formed generation request: the
    replica answers those (errors included)."""
    from tierlm.serve.protocol import ChatCompletionRequest, CompletionRequest
    try:
        if path == "/v1/chat/completions":
            messages = ChatCompletionRequest.model_validate_json(body).chat_messages()
            return tokenizer.encode_chat(messages, allow_special_tokens_in_content)
        if path == "/v1/completions":
            prompt = CompletionRequest.model_validate_json(body).single_prompt()
            return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    except Exception:  # noqa: BLE001 - a bad body is the replica's to refuse, with the single server's error
        return None
    return None


class HashRing:
    """VNODES points per replica on a 64-bit ring; a key's replicas are the distinct ones met clockwise."""

    def __init__(self, replicas: Sequence[str], vnodes: int = VNODES):
        points = sorted((_hash64(f"{r}#{v}".encode()), r) for r in replicas for v in range(vnodes))
        self.positions = [p for p, _ in points]
        self.owners = [r for _, r in points]
        self.replicas = frozenset(replicas)

    def walk(self, key: int) -> list[str]:
        """Every replica once, in ring order from the key's position."""
        order: list[str] = []
        start = bisect.bisect_left(self.positions, key)
        for i in range(len(self.owners)):
            r = self.owners[(start + i) % len(self.owners)]
            if r not in order:
                order.append(r)
                if len(order) == len(self.replicas):
                    break
        return order


def bounded_order(ring: HashRing, key: int, loads: Mapping[str, int], factor: float = LOAD_FACTOR) -> list[str]:
    """The ring's replicas for `key`, the first one under the load bound moved to the front. Some replica is
    always under it: if all n held >= ceil(c (total+1) / n) requests, the total would exceed itself (c >= 1)."""
    order = ring.walk(key)
    total = sum(loads.get(r, 0) for r in order)
    bound = math.ceil(factor * (total + 1) / len(order))
    first = next(i for i, r in enumerate(order) if loads.get(r, 0) < bound)
    return [order[first], *order[:first], *order[first + 1:]]
