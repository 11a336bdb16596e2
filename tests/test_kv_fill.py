"""The filled-slot count PagedKV keeps (what waste() and the scheduler's waste_sum read) equals the walk over
every block of every live sequence, through admissions, prefix hits shared by several sequences, preemption,
sliding-window drops, a pool resize and sequences stepped without admission."""
from __future__ import annotations

import pytest
import torch
from helpers import chunked_engine

from tierlm import LLM, SamplingParams
from tierlm.kvcache.paged import PagedKV
from tierlm.kvcache.pool import block_nbytes
from tierlm.kvcache.sequence import DROPPED, KVSequence
from tierlm.weights import open_model

BS = 4


def walk_filled_slots(kv: PagedKV) -> int:
    """PagedKV.filled_slots by its definition: every block of every live sequence, a shared block counted once,
    as full as its fullest owner (what the kept count must equal)."""
    filled: dict[int, int] = {}
    for s in kv.live:
        for j, b in enumerate(s.blocks):
            if b != DROPPED:
                filled[b] = max(filled.get(b, 0), min(kv.block_size, s.num_computed - j * kv.block_size))
    return sum(filled.values())


def _config(tiny_models, name: str):
    source = open_model(str(tiny_models[name].path))
    try:
        return source.config
    finally:
        source.close()


def _check(kv: PagedKV) -> None:
    assert kv.filled_slots() == walk_filled_slots(kv)


def _advance(kv: PagedKV, seqs: list[KVSequence], t: int) -> None:
    """t more of each sequence's known tokens computed (no forward pass: only the bookkeeping is under test)."""
    for s in seqs:
        kv.reserve(s, t)
    _check(kv)  # reserved, still empty blocks fill nothing
    kv.step(seqs, t).finish()
    _check(kv)


def _decode(kv: PagedKV, seqs: list[KVSequence], n: int) -> None:
    for i in range(n):
        for s in seqs:
            s.tokens.append(1000 + i)
        _advance(kv, seqs, 1)


@pytest.mark.parametrize("name", ["llama_gqa_tied", "mistral_swa"])  # mistral_swa: a sliding window of 8
def test_kept_count_equals_the_walk(tiny_models, name):
    cfg = _config(tiny_models, name)
    kv = PagedKV(cfg, num_blocks=40, block_size=BS, capacity=48)
    prefix = list(range(3, 3 + 3 * BS))  # 3 full blocks
    a = KVSequence(tokens=prefix + [90, 91])
    kv.admit(a)
    _check(kv)
    _advance(kv, [a], 5)
    _advance(kv, [a], len(a.tokens) - a.num_computed)  # prefilled: a's full blocks are cached
    b, c = KVSequence(tokens=prefix + [70]), KVSequence(tokens=prefix + [71, 72])
    kv.admit(b)
    kv.admit(c)
    _check(kv)
    # owners of each prefix block, counted once (under the window, a already dropped its first)
    assert b.blocks[:3] == c.blocks[:3] and a.blocks[1:3] == b.blocks[1:3]
    _advance(kv, [b, c], 1)
    _advance(kv, [c], 1)
    _decode(kv, [a, b, c], 6)
    kv.free(a)  # preempted: b and c still hold the shared blocks
    _check(kv)
    kv.admit(a)  # re-admitted: its prefix comes back from the cache
    _check(kv)
    _advance(kv, [a], len(a.tokens) - a.num_computed)
    _decode(kv, [a, b], 2 * BS + 3)  # under the window, a and b drop their oldest (shared) blocks
    if cfg.sliding_window is not None:
        assert a.num_dropped and b.num_dropped and c.num_dropped
    d = KVSequence(tokens=prefix + [90, 91, 92])  # a prefix some holders dropped and one still holds
    kv.admit(d)
    _check(kv)
    _advance(kv, [d], len(d.tokens) - d.num_computed)
    e = KVSequence(tokens=prefix + [93])  # a request that scores its prompt: admitted without its cached prefix
    kv.admit(e, use_cache=False)
    assert e.num_computed == 0 and not e.blocks
    _check(kv)
    _advance(kv, [e], len(e.tokens))
    kv.free(e)
    _check(kv)
    lone = KVSequence(tokens=list(range(200, 207)))  # stepped without admission: not a live sequence
    kv.reserve(lone, 7)
    kv.step([lone], 7).finish()
    _check(kv)
    assert kv.resize(48) and kv.resize(40)  # the pool grows and shrinks under the live sequences
    _check(kv)
    for s in (b, d, c, a):
        kv.free(s)
        _check(kv)
    assert kv.filled_slots() == 0 and not kv._holders
    kv.release()


@pytest.mark.parametrize("name, blocks", [("llama_gqa_tied", 16), ("mistral_swa", 8)])
def test_scheduler_waste_equals_the_walk(tiny_models, name, blocks, monkeypatch):
    """Through the engine (shared prefixes, a pool small enough to preempt): each waste the scheduler adds to
    waste_sum is the one the walk gives, and so is their sum."""
    path = tiny_models[name].path
    llm = LLM(path, progress=False, block_size=BS,
              kv_memory=blocks * block_nbytes(_config(tiny_models, name), BS, torch.float32))
    llm.engine = chunked_engine(llm, 8)  # 12 tokens a step: a chunk of 8 and 4 decodes
    kv, walked = llm.kv, []
    kept = kv.waste

    def waste() -> float:
        _check(kv)
        used = kv.manager.num_blocks - kv.manager.num_free
        walked.append(1 - walk_filled_slots(kv) / (used * BS) if used else 0.0)
        return kept()

    monkeypatch.setattr(kv, "waste", waste)
    shared = list(range(5, 5 + 3 * BS))
    prompts = [shared + [40 + i] * (i + 1) for i in range(6)]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))
    c = llm.engine.scheduler.counters
    assert c.preemptions > 0 and kv.hit_tokens > 0 and len(walked) == c.decode_steps
    assert c.waste_sum == sum(walked)
    assert kv.filled_slots() == 0 and kv.manager.num_free == kv.manager.num_blocks
