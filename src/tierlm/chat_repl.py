"""`tierlm chat`: an interactive loop that keeps the conversation and renders it with the chat template.

Commands: /reset clears the history, /exit (or EOF) quits. When the conversation outgrows the context,
the oldest turns are dropped (the system prompt stays). Each turn's prompt is the whole conversation: its
earlier part is served by the prefix cache. `--session NAME` keeps the conversation and its KV blocks on
disk between runs (session.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from tierlm import LLM, RequestOutput, SamplingParams
from tierlm.session import load_history, save_history

HELP = "(/reset clears the history, /exit quits)"


def _fit(llm: LLM, messages: list[dict[str, str]], reserve: int) -> list[int]:
    """Token ids of the rendered conversation, dropping the oldest turns until `reserve` tokens fit."""
    budget = llm.max_context - reserve
    while True:
        ids = llm.encode_chat(messages)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) <= budget or len(messages) - first <= 1:
            return ids
        del messages[first:first + 2]  # one user turn and its reply
        print("[history trimmed to fit the context]", file=sys.stderr)


def run_chat(llm: LLM, params: SamplingParams, system: str | None, stats: bool = False,
             session: Path | None = None) -> int:
    """The REPL. With `session` (a directory), the conversation and its KV blocks are resumed from it and
    saved back to it on exit (incrementally)."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if session is not None:
        saved = load_history(session)
        if saved:
            history = saved
            blocks = llm.load_prefix_cache(session / "kv") if (session / "kv").exists() else 0
            print(f"[resumed session {session.name}: {sum(m['role'] == 'user' for m in saved)} turns, "
                  f"{blocks} KV blocks]", file=sys.stderr)
    try:
        return _loop(llm, params, history, system, stats)
    finally:
        if session is not None:
            save_history(session, history)
            written = llm.save_prefix_cache(session / "kv")
            print(f"[session {session.name} saved: {written} new KV blocks]", file=sys.stderr)


def _loop(llm: LLM, params: SamplingParams, history: list[dict[str, str]], system: str | None,
          stats: bool) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"tierlm chat — {llm.config.name or llm.config.arch} {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history[:] = history[:1] if system else []
            print("[history cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        ids = _fit(llm, history, reserve=min(params.max_tokens, llm.max_context // 2))
        out = RequestOutput()
        for delta in llm.stream(ids, params, out):
            print(delta, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": out.text})
        if stats:
            print(llm.stats_text(out), file=sys.stderr)
