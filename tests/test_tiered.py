"""Tiered weights compute exactly what resident weights compute: every tier mix, ring depth and prefill
chunking gives bit-identical logits (fp32, CPU) and the same greedy tokens; a corrupt unit is rebuilt from the
source (or, with the source changed, a clear error)."""
from __future__ import annotations

import shutil
import time

import pytest
import torch
from helpers import cached_pages, engine_logits, flip, runner_engine

from tierlm import LLM, SamplingParams
from tierlm.engine.runner import Runner
from tierlm.offload import disk_layout as offload_layout
from tierlm.offload.disk_store import DATA_FILE, ChecksumError
from tierlm.offload.stats import describe_stats
from tierlm.offload.weight_store import WeightStore
from tierlm.offload.tier import Tier
from tierlm.weights import open_model

D, K = Tier.DEVICE, Tier.DISK
PROMPT = [3, 17, 99, 42, 250, 7, 7, 301, 12, 64, 5]


def _logits(tok, store: WeightStore, prompt: list[int], steps: int, prefill_chunk: int = 512,
            dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Through an engine: prefill logits [T, V], then one [V] per greedy decode step."""
    runner = Runner(store, dtype, prefill_chunk=prefill_chunk, max_context=64)
    engine = runner_engine(runner, tok)
    try:
        logits, _ = engine_logits(engine, prompt, steps)  # [T + steps, V]
    finally:
        engine.kv.release()
    return [logits[:len(prompt)], *logits[len(prompt):]]


@pytest.fixture(scope="module")
def tok(tiny_models):
    """The tiny models' tokenizer (they share one): what an engine detokenises with."""
    return open_model(tiny_models["llama3_rope"].path).tokenizer


def _placed(path, tmp_path, layers, head, embed, ring=2) -> WeightStore:
    return WeightStore.load_placed(open_model(path), torch.float32, torch.device("cpu"), layers, head, embed,
                                   progress=False, ring_depth=ring, offload_dir=tmp_path / "off")


@pytest.fixture(scope="module")
def resident(tiny_models, tok):
    """Resident reference logits per model (prefill chunk 512, i.e. one pass)."""
    cache = {}

    def get(name: str) -> list[torch.Tensor]:
        if name not in cache:
            store = WeightStore.load_resident(open_model(tiny_models[name].path), torch.float32, progress=False)
            cache[name] = _logits(tok, store, PROMPT, steps=4)
        return cache[name]
    return get


MIXES = {  # (layer tiers for a 2-layer model, head, embed, ring depth)
    "all-disk": ([K, K], K, K, 2),
    "mixed": ([D, K], D, D, 2),
    "mixed-head-disk": ([K, D], K, D, 2),
    "embed-rows-from-disk": ([D, D], D, K, 2),
    "ring-1": ([K, K], K, K, 1),
    "ring-3": ([K, K], D, K, 3),
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("name", ["llama3_rope", "qwen2"])
def test_every_tier_mix_matches_resident_exactly(tiny_models, resident, tmp_path, name, mix, tok):
    layers, head, embed, ring = MIXES[mix]
    store = _placed(tiny_models[name].path, tmp_path, layers, head, embed, ring)
    try:
        got = _logits(tok, store, PROMPT, steps=4)
        assert store.stats.disk_bytes > 0
    finally:
        store.close()
    for g, r in zip(got, resident(name), strict=True):
        assert torch.equal(g, r)


@pytest.mark.parametrize("head", [D, K])
def test_tied_embedding_rows_come_from_the_head_wherever_it_lives(tiny_models, resident, tmp_path, head, tok):
    store = _placed(tiny_models["llama_gqa_tied"].path, tmp_path, [K, D, K], head, D)
    try:
        assert store.embed_tier == head  # one matrix: the embedding follows the head
        got = _logits(tok, store, PROMPT, steps=3)
    finally:
        store.close()
    for g, r in zip(got, resident("llama_gqa_tied")[:4], strict=True):
        assert torch.equal(g, r)


def test_chunked_prefill_through_the_ring_matches_resident(tiny_models, tmp_path, tok):
    """Prefill in chunks of 4 re-streams the layers per chunk; the result equals a resident chunked run and
    the one-pass run (up to float reassociation across chunks: close, same argmax)."""
    path = tiny_models["mistral_swa"].path
    ref = _logits(tok, WeightStore.load_resident(open_model(path), torch.float32, progress=False), PROMPT, 3, prefill_chunk=4)
    store = _placed(path, tmp_path, [K, K], K, K, ring=2)
    try:
        got = _logits(tok, store, PROMPT, steps=3, prefill_chunk=4)
        assert store.stats.forward_passes == 3 + 3  # ceil(11 / 4) prefill chunks + 3 decode steps
    finally:
        store.close()
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r)


def test_budgeted_llm_generates_the_resident_tokens(tiny_models, tmp_path):
    path = tiny_models["llama3_rope"].path
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = LLM(path, progress=False).generate([PROMPT], params)[0].token_ids
    # 2 layers of 197 KiB each, head and embed 128 KiB: 660 KiB leaves part of the model on disk
    with LLM(path, progress=False, max_memory={"cpu": "660KiB"}, offload_dir=tmp_path / "off", max_context=64) as llm:
        assert llm.plan is not None and llm.plan.count(Tier.DISK) >= 1
        assert llm.plan.device_bytes <= 660 << 10
        out = llm.generate([PROMPT], params)[0]
        assert out.token_ids == want
        assert out.metrics.tiers.disk_bytes > 0
        assert "disk" in llm.stats_text(out) and "overlap η" in llm.stats_text(out)
    data = tmp_path / "off" / DATA_FILE
    assert cached_pages(data) == 0  # the store was read with O_DIRECT: the page cache is no hidden tier
    for f in path.glob("*.safetensors"):
        assert cached_pages(f) == 0  # the source was evicted after loading the resident part


def _corrupted(tiny_models, tmp_path, name: str = "llama3_rope"):
    """A private copy of the model and a store built from it with one byte of layers.1 flipped on disk (the
    store reopened: the manifest matches, the bytes are bad) -> (model dir, bytes of the good data file)."""
    path = tmp_path / "model"
    shutil.copytree(tiny_models[name].path, path)
    store = _placed(path, tmp_path, [K, K], D, K)
    unit = store.streamer.offload.units["layers.1"]
    store.close()
    good = (tmp_path / "off" / DATA_FILE).read_bytes()
    flip(tmp_path / "off" / DATA_FILE, unit.offset + 100)
    return path, good


def test_corrupt_unit_is_rebuilt_from_the_source_and_the_run_matches_resident(tiny_models, resident, tmp_path, tok):
    path, good = _corrupted(tiny_models, tmp_path)
    store = _placed(path, tmp_path, [K, K], D, K)
    try:
        got = _logits(tok, store, PROMPT, steps=4)
        assert store.stats.repairs == 1 and store.stats.retries >= 1
        assert "1 corrupt unit rebuilt from the source" in describe_stats(store.stats, 5, None)
    finally:
        store.close()
    for g, r in zip(got, resident("llama3_rope"), strict=True):
        assert torch.equal(g, r)
    assert (tmp_path / "off" / DATA_FILE).read_bytes() == good  # the file is whole again


def test_corrupt_unit_with_a_changed_source_is_a_clear_error(tiny_models, tmp_path, tok):
    path, _ = _corrupted(tiny_models, tmp_path)
    store = _placed(path, tmp_path, [K, K], D, K)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # edited after the run opened the store
    try:
        with pytest.raises(ChecksumError, match=r"layers\.1.*after one re-read.*source .* changed since"):
            _logits(tok, store, PROMPT, steps=1)
        assert store.stats.retries >= 1 and store.stats.repairs == 0
    finally:
        store.close()


def test_a_failed_load_waits_for_its_other_reads_before_raising(tiny_models, tmp_path, monkeypatch):
    """A chunk failing twice must not leave the load's other chunk reads running: they would land in the slot
    after it is reused. Every read of the load is done when the error comes out."""
    monkeypatch.setattr(offload_layout, "CHUNK_BYTES", 4096)  # ~50 chunks per layer: many reads in flight
    path, _ = _corrupted(tiny_models, tmp_path)  # chunk 0 of layers.1 is bad
    store = _placed(path, tmp_path, [K, K], D, K)
    streamer = store.streamer
    monkeypatch.setattr(streamer.offload, "origin", None)  # nothing to rebuild from: the second failure raises
    read_chunk, loads = streamer.offload.read_chunk, []

    def slow_read(reader, unit, chunk, buf):
        if chunk[0]:
            time.sleep(0.005)  # every chunk but the bad first one lands late
        return read_chunk(reader, unit, chunk, buf)

    def submit(fn, unit, *args):
        loads.append((unit, pool_submit(fn, unit, *args)))
        return loads[-1][1]
    pool_submit = streamer._pool.submit
    monkeypatch.setattr(streamer.offload, "read_chunk", slow_read)
    monkeypatch.setattr(streamer._pool, "submit", submit)
    try:
        streamer._start(0)  # resubmitted through the patches
        store.acquire(0)
        store.release(0)
        with pytest.raises(ChecksumError, match=r"layers\.1.*after one re-read.*no source to rebuild"):
            store.acquire(1)
        reads = [f for unit, f in loads if unit == "layers.1"]  # one load of layers.1 was submitted
        assert len(reads) > 40 and all(f.done() for f in reads)
    finally:
        store.close()


def test_interrupted_pass_restarts_the_stream(tiny_models, resident, tmp_path, tok):
    """A forward pass abandoned half-way (an exception in user code between layers) leaves the ring
    mid-cycle; the next pass restarts it and computes the right thing."""
    store = _placed(tiny_models["llama3_rope"].path, tmp_path, [K, K], K, D, ring=2)
    try:
        store.acquire(0)  # the runner never released it
        got = _logits(tok, store, PROMPT, steps=2)
    finally:
        store.close()
    for g, r in zip(got, resident("llama3_rope")[:3], strict=True):
        assert torch.equal(g, r)
    assert store.stats.restarts == 1  # the abandoned pass, once


def test_long_prompt_passes_over_a_streamed_head_without_restarting(tiny_models, tmp_path, tok):
    """A prompt of several prefill chunks skips the head on all but the last chunk; the ring had already
    prefetched it, so the runner passes over it in order instead of draining and re-reading the stream."""
    path = tiny_models["llama3_rope"].path

    def last_logits(store: WeightStore) -> torch.Tensor:
        engine = runner_engine(Runner(store, torch.float32, prefill_chunk=3, max_context=64), tok)
        try:  # 11 tokens: 4 chunks, the head on the last only
            return engine_logits(engine, PROMPT, score=False)[0]  # [1, V]
        finally:
            engine.kv.release()

    store = _placed(path, tmp_path, [K, K], K, D, ring=2)
    try:
        got = last_logits(store)
        assert store.stats.restarts == 0
        assert store.stats.units_streamed == 4 * 3  # 2 layers + the head per chunk, in order
    finally:
        store.close()
    want = last_logits(WeightStore.load_resident(open_model(path), torch.float32, progress=False))
    assert torch.equal(got, want)
