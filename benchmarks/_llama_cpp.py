"""Greedy generation through llama-cpp-python, shared by the benchmarks that run llama.cpp beside tierlm.
No torch import: a llama.cpp worker's memory must be llama.cpp's own."""
from __future__ import annotations

import time


def argmax_logits(llm) -> int:
    """The greedy token from the context's last logits (llama-cpp-python's Llama)."""
    import numpy as np
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))


def greedy(llm, prompt_ids: list[int], n: int) -> tuple[float, float, list[int]]:
    """reset(), eval() the prompt, then one token per eval(): (TTFT s, decode s for the n-1 later tokens, ids)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    token = argmax_logits(llm)
    ttft = time.perf_counter() - t0
    tokens, decode_s = [token], 0.0
    for _ in range(n - 1):
        t0 = time.perf_counter()
        llm.eval([token])
        token = argmax_logits(llm)
        decode_s += time.perf_counter() - t0
        tokens.append(token)
    return ttft, decode_s, tokens
