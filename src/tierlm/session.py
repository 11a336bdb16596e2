"""Chat sessions on disk: the conversation (history.json) and its KV blocks (kv/), so `tierlm chat --session
NAME` resumes without prefilling the conversation again.

    <sessions>/<NAME>/history.json   the messages, written atomically
    <sessions>/<NAME>/kv/            a saved prefix cache (block files + manifest; see kvcache/block_file.py)

Saving is incremental: only blocks not yet in kv/ are written. Loading is lazy: blocks are restored (and
verified) when the rendered conversation's prefix hits them; a block of another model or KV format is
refused at load time, a corrupt one is recomputed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from tierlm.config import cache_dir
from tierlm.errors import ModelFormatError, UsageError
from tierlm.kvcache.block_file import atomic_write

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def session_dir(name: str, root: str | Path | None = None) -> Path:
    if not _NAME.match(name) or name in (".", ".."):
        raise UsageError(f"session name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    base = Path(root) if root is not None else cache_dir() / "sessions"
    return base / name


def load_history(directory: Path) -> list[dict[str, str]]:
    path = directory / "history.json"
    if not path.exists():
        return []
    try:
        messages = json.loads(path.read_text())
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
            for m in messages)
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: unreadable session history ({e})") from None
    if not ok:
        raise ModelFormatError(f"{path}: not a list of {{role, content}} messages")
    return messages


def save_history(directory: Path, messages: list[dict[str, str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "history.json", json.dumps(messages, ensure_ascii=False, indent=1).encode())
