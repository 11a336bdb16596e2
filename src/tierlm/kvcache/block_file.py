"""One KV block on disk: a self-describing, checksummed file written atomically.

    "TLKVBLK1" | u32 header length | header (JSON) | payload
    header: {"hash", "parent", "tokens", "store", "nbytes" (payload before compression), "codec", ["salt",] "xxh3"}

The same bytes are a value of the remote (Redis) tier (encode_block / decode_block), with the salt's digest in
the header there: a shared store may hold blocks of many models.

The checksum (XXH3-64) covers the header fields and the stored payload, so a flipped bit anywhere is
caught on read; a torn write cannot be seen because files are written to a temporary name, fsync'ed and
renamed into place. Written and read files are dropped from the OS page cache: the disk tier is disk, not
a hidden RAM tier. The payload is the block's raw bytes (pool.read_block), optionally zstd-compressed.
A block directory also holds `manifest.json` with the salt (model and KV format identity): blocks saved
by another model or format are refused, never loaded.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import xxhash

from tierlm.errors import ModelFormatError, UsageError, is_storage_error, storage_error
from tierlm.memory.directio import drop_from_page_cache

MAGIC = b"TLKVBLK1"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class CorruptBlockError(Exception):
    """A block file failed its checksum or is truncated (the caller recomputes the block)."""


@dataclass(frozen=True)
class StoredBlock:
    hash: bytes
    parent: bytes
    tokens: tuple[int, ...]
    payload: bytes  # uncompressed


def codec_module(name: str):
    if name == "none":
        return None
    if name == "zstd":
        try:
            import zstandard
        except ImportError:
            raise UsageError("kv_compress='zstd' needs the zstandard package: pip install zstandard") from None
        return zstandard
    raise UsageError(f"unknown KV compression {name!r} (use none or zstd)")


def _digest(meta: dict, data: bytes) -> int:
    h = xxhash.xxh3_64()
    h.update(json.dumps({k: meta[k] for k in sorted(meta) if k != "xxh3"}, sort_keys=True).encode())
    h.update(data)
    return h.intdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """`path` holds `data` whole or keeps what it held before: written to a temp name unique to this process
    and call (concurrent writers never share one), fsync'ed, renamed. On any failure the temp file is removed;
    a full disk, a denied permission or a read-only filesystem is a StorageError naming `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if is_storage_error(e):
            raise storage_error(str(path), e) from None
        raise


def encode_block(block: StoredBlock, storage: str, codec: str = "none", salt: bytes | None = None) -> bytes:
    """One block as self-describing, checksummed bytes (the file's and the remote tier's value). `salt`: the
    model/KV-format identity it was computed under, recorded (as a digest) so a reader of a shared Redis or directory can
    refuse another model's block even under a colliding key."""
    mod = codec_module(codec)
    data = block.payload if mod is None else mod.ZstdCompressor(level=3).compress(block.payload)
    meta = {"hash": block.hash.hex(), "parent": block.parent.hex(), "tokens": list(block.tokens), "store": storage,
            "nbytes": len(block.payload), "codec": codec}
    if salt is not None:
        meta["salt"] = xxhash.xxh3_64_hexdigest(salt)
    meta["xxh3"] = _digest(meta, data)
    header = json.dumps(meta).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + data


def decode_block(blob: bytes, storage: str, want_hash: bytes, salt: bytes | None = None, name: str = "") -> StoredBlock:
    """The inverse of encode_block, verified: CorruptBlockError when the bytes do not check out, are of another
    KV format, block (hash) or salt."""
    name = name or want_hash.hex()
    try:
        if blob[:8] != MAGIC:
            raise CorruptBlockError(f"{name}: not a KV block")
        (n,) = struct.unpack_from("<I", blob, 8)
        meta = json.loads(blob[12:12 + n])
        data = blob[12 + n:]
        if meta["xxh3"] != _digest(meta, data) or meta["store"] != storage or meta["hash"] != want_hash.hex():
            raise CorruptBlockError(f"{name}: checksum or format mismatch")
        if salt is not None and meta.get("salt") != xxhash.xxh3_64_hexdigest(salt):
            raise CorruptBlockError(f"{name}: a block of another model or KV format")
        mod = codec_module(meta["codec"])
        payload = data if mod is None else mod.ZstdDecompressor().decompress(data, max_output_size=meta["nbytes"])
        if len(payload) != meta["nbytes"]:
            raise CorruptBlockError(f"{name}: payload is {len(payload)} bytes, header says {meta['nbytes']}")
        return StoredBlock(want_hash, bytes.fromhex(meta["parent"]), tuple(meta["tokens"]), payload)
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise CorruptBlockError(f"{name}: {e}") from None


def write_block(directory: Path, block: StoredBlock, storage: str, codec: str = "none") -> int:
    """Write one block file (named by its hash); returns the bytes written."""
    blob = encode_block(block, storage, codec)
    path = directory / f"{block.hash.hex()}.kvb"
    atomic_write(path, blob)
    drop_from_page_cache(path)
    return len(blob)


def read_block(path: Path, storage: str) -> StoredBlock:
    """Read and verify one block file; CorruptBlockError when it does not check out."""
    try:
        blob = path.read_bytes()
        drop_from_page_cache(path)
        want = bytes.fromhex(path.stem)
    except (OSError, ValueError) as e:
        raise CorruptBlockError(f"{path.name}: {e}") from None
    return decode_block(blob, storage, want, name=path.name)


def open_block_dir(directory: Path, salt: bytes, create: bool) -> Path:
    """Check (or create) a block directory's manifest: the salt must be ours."""
    manifest = directory / MANIFEST
    want = {"version": MANIFEST_VERSION, "salt": xxhash.xxh3_128_hexdigest(salt)}
    if manifest.exists():
        try:
            got = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{manifest}: unreadable KV manifest ({e})") from None
        if got != want:
            raise UsageError(f"{directory} holds KV blocks of another model or KV format; use another directory")
    elif create:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(manifest, json.dumps(want).encode())
    else:
        raise UsageError(f"{directory} is not a saved KV cache (no {MANIFEST})")
    return directory


def open_spill_dir(directory: Path, salt: bytes) -> tuple[Path, int]:
    """A KV tier's spill directory is a cache the tier owns (it deletes files past its capacity): blocks another
    model, KV format or numerics version wrote there are deleted, never served, and the directory is taken
    over. Returns (directory, files deleted). A directory the user saved a cache to is open_block_dir's."""
    try:
        return open_block_dir(directory, salt, create=True), 0
    except (UsageError, ModelFormatError):
        stale = list(directory.glob("*.kvb"))
        for f in stale:
            f.unlink(missing_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)
        return open_block_dir(directory, salt, create=True), len(stale)
