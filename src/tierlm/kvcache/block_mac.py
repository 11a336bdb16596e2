"""A shared tier's values bound to their key and deployment: an HMAC with a secret the replicas share.

    sealed value  "TLKVMAC1" | tag (32 bytes) | encode_block(...)
    tag           HMAC-SHA256(K, "TLKVMAC1" | u32 len(key) | key | value),  K = HMAC-SHA256(secret, DOMAIN)

The block format's checksum (XXH3) catches accidents, not adversaries: anyone who can write to the Redis can
re-encode another prompt's KV under this prompt's key with a valid checksum (issue 23). The tag can only be made
with the secret, and it covers the whole Redis key (namespace, salt digest, chain hash), so a value is refused
when it was written by anyone without the secret, or copied verbatim from another key (another block, another
namespace). A verbatim copy under its own key is harmless: keys are content addresses (the chain hash fixes the
tokens and the salt the model and numerics), so the same key always means the same KV.

HMAC-SHA256 rather than keyed BLAKE2b: on x86 with SHA extensions OpenSSL's SHA-256 ran at 1.4 GB/s here against
hashlib's BLAKE2b at 0.56 GB/s; both are standard, and every replica must use the same one, so it is fixed.
K is derived from the secret (domain-separated), so a secret reused elsewhere gives tags that mean nothing there.
The tag is checked in constant time before the value is decoded; nothing of a refused value reaches a tier.
What it does not give: confidentiality (values are plain: anyone who can read the Redis reads the tokens and
the KV) or availability (anyone who can write can delete or spoil values: that only costs recomputation).
"""
from __future__ import annotations

import hashlib
import hmac
import struct

from tierlm.errors import UsageError
from tierlm.kvcache.block_file import CorruptBlockError

MAC_MAGIC = b"TLKVMAC1"
TAG_BYTES = 32
HEADER = len(MAC_MAGIC) + TAG_BYTES
DOMAIN = b"tierlm kv remote tier v1"


class ForgedBlockError(CorruptBlockError):
    """A value whose tag does not check out: written without this deployment's secret, under another key, or
    tampered with. A CorruptBlockError too: the caller recomputes the block, as for a flipped bit."""


class BlockSeal:
    """Seals and opens a shared tier's values. `secret` None: values are stored plain and read as they are (the
    tier trusts anyone who can write to it); a sealed value is then refused (it belongs to a deployment with a
    secret, and this one cannot check it)."""

    def __init__(self, secret: str | None):
        if secret is not None and not isinstance(secret, str):
            raise UsageError(f"kv_remote_secret must be a string, got {type(secret).__name__}")
        if secret is not None and not secret.strip():
            raise UsageError("kv_remote_secret is empty: give a secret (e.g. `openssl rand -hex 32`), or none")
        self._key = None if secret is None else hmac.digest(secret.encode(), DOMAIN, "sha256")

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def _tag(self, key: bytes, value: bytes | memoryview) -> bytes:
        assert self._key is not None
        mac = hmac.new(self._key, MAC_MAGIC + struct.pack("<I", len(key)) + key, hashlib.sha256)
        mac.update(value)
        return mac.digest()

    def seal(self, key: bytes, value: bytes) -> bytes:
        """`value` as stored under `key` (unchanged without a secret)."""
        if self._key is None:
            return value
        return MAC_MAGIC + self._tag(key, value) + value

    def open(self, key: bytes, stored: bytes) -> bytes:
        """The value sealed under `key`, verified; ForgedBlockError when it was not sealed under this key with
        this secret (or, without a secret, when it was sealed at all)."""
        name = key.decode(errors="replace")
        sealed = stored[:len(MAC_MAGIC)] == MAC_MAGIC
        if self._key is None:
            if sealed:
                raise ForgedBlockError(f"{name}: sealed by a deployment with kv_remote_secret; this one has none")
            return stored
        if not sealed or len(stored) < HEADER:
            raise ForgedBlockError(f"{name}: not sealed (written without kv_remote_secret)")
        tag = stored[len(MAC_MAGIC):HEADER]
        if not hmac.compare_digest(tag, self._tag(key, memoryview(stored)[HEADER:])):
            raise ForgedBlockError(f"{name}: bad MAC (another secret, another key's value, or forged)")
        return stored[HEADER:]
