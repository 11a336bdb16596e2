"""KV tiers: blocks evicted from the pool go to host then disk and come back on a prefix hit with identical
outputs; a corrupted block is recomputed; saved prefix caches load lazily and only for the same model."""
from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.errors import UsageError
from tierlm.kvcache.pool import block_nbytes

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
A = list(range(10, 43))  # 33 tokens: 8 full blocks of 4
B = list(range(100, 133))
C = list(range(200, 233))


def _per_block(path) -> int:
    from tierlm.weights import open_model
    return block_nbytes(open_model(path).config, 4, torch.float32)


def _small(path, tmp_path, **kw) -> LLM:
    """A pool of 12 blocks of 4 tokens: one 39-token request fills it, so the next evicts the previous."""
    kw.setdefault("kv_offload_dir", tmp_path / "kv")
    return LLM(path, progress=False, block_size=4, kv_memory=12 * _per_block(path), **kw)


def _reference(path, prompts) -> list[list[int]]:
    ref = LLM(path, progress=False, enable_prefix_caching=False)
    return [ref.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_evicted_blocks_go_host_then_disk_and_restore_identically(tiny_models, tmp_path):
    path = tiny_models["llama_gqa_tied"].path
    want = _reference(path, [A + [50], B + [50], C + [50], A + [60]])
    llm = _small(path, tmp_path, kv_host_memory=4 * _per_block(path))
    got = [llm.generate([p], GREEDY)[0].token_ids for p in (A + [50], B + [50], C + [50])]
    t = llm.kv.tiers.counters
    llm.kv.tiers.flush()  # the writer has written every spill: restores are from disk, not its queue
    assert t.host_puts > 0 and t.disk_writes > 0  # A's blocks left the pool for host, then spilled to disk
    got.append(llm.generate([A + [60]], GREEDY)[0].token_ids)
    assert got == want
    assert t.host_restores + t.disk_restores == 8 and t.disk_restores > 0
    assert llm.kv.restored_tokens == 32
    assert "restores host" in llm.kv_stats().describe()


def test_corrupted_block_is_detected_and_recomputed(tiny_models, tmp_path):
    path = tiny_models["qwen2"].path
    want = _reference(path, [A + [50], B + [50], C + [50], A + [60]])
    llm = _small(path, tmp_path)  # no host tier: evictions go straight to disk
    for p in (A + [50], B + [50], C + [50]):
        llm.generate([p], GREEDY)
    llm.kv.tiers.flush()  # the writer thread has written every spill
    files = sorted((tmp_path / "kv").glob("*.kvb"))
    assert files
    from tierlm.kvcache.blocks import ROOT_HASH, block_hash
    first = (tmp_path / "kv" / f"{block_hash(ROOT_HASH, tuple(A[:4]), llm.kv.manager.salt).hex()}.kvb")
    data = bytearray(first.read_bytes())
    data[-7] ^= 0x40  # one flipped bit in the payload of A's first block
    first.write_bytes(bytes(data))
    assert llm.generate([A + [60]], GREEDY)[0].token_ids == want[3]
    t = llm.kv.tiers.counters
    assert t.corrupt == 1 and t.disk_restores == 0 and not first.exists()


def test_save_and_load_prefix_cache(tiny_models, tmp_path):
    path = tiny_models["llama3_rope"].path
    want = _reference(path, [A + [70]])
    first = LLM(path, progress=False, block_size=4)
    first.generate([A + [50]], GREEDY)
    assert first.save_prefix_cache(tmp_path / "s") == 8 + 1  # A's 8 blocks + the block holding 50 and output
    assert first.save_prefix_cache(tmp_path / "s") == 0  # incremental: nothing new
    second = LLM(path, progress=False, block_size=4)
    assert second.load_prefix_cache(tmp_path / "s") == 9
    assert second.generate([A + [70]], GREEDY)[0].token_ids == want[0]
    assert second.kv.restored_tokens == 32  # prefill skipped for A's 8 blocks
    other = LLM(path, progress=False, block_size=4, kv_dtype="int8")
    with pytest.raises(UsageError, match="another model or KV format"):
        other.load_prefix_cache(tmp_path / "s")
    with pytest.raises(UsageError, match="not a saved KV cache"):
        other.load_prefix_cache(tmp_path)


def test_restore_or_recompute_by_cost(tiny_models, tmp_path):
    path = tiny_models["qwen2"].path
    llm = _small(path, tmp_path)
    for p in (A + [50], B + [50], C + [50]):
        llm.generate([p], GREEDY)
    llm.kv.tiers.flush()  # every spill written: no block is still served from the writer's queue (memory)
    llm.kv.tiers.disk_gbps = 1e-9  # a disk so slow that recomputing is predicted cheaper
    llm.generate([A + [60]], GREEDY)
    assert llm.kv.tiers.counters.recompute_chosen == 1 and llm.kv.restored_tokens == 0


def test_zstd_blocks_round_trip(tiny_models, tmp_path):
    pytest.importorskip("zstandard")
    path = tiny_models["qwen2"].path
    want = _reference(path, [A + [60]])
    llm = _small(path, tmp_path, kv_compress="zstd")
    for p in (A + [50], B + [50], C + [50]):
        llm.generate([p], GREEDY)
    llm.kv.tiers.flush()  # otherwise a restore may race the writer and be served from its queue
    assert llm.generate([A + [60]], GREEDY)[0].token_ids == want[0]
    assert llm.kv.tiers.counters.disk_restores > 0


def test_chat_session_resumes_without_prefilling_again(tiny_models, tmp_path, monkeypatch, capsys):
    import io

    from tierlm.chat_repl import run_chat
    from tierlm.session import session_dir
    path = tiny_models["llama_gqa_tied"].path
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    where = session_dir("demo", tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me about paging\nand about caches\n"))
    assert run_chat(LLM(path, progress=False, block_size=4), params, "be brief", session=where) == 0
    err = capsys.readouterr().err
    assert "session demo saved:" in err and (where / "history.json").exists()
    saved = len(list((where / "kv").glob("*.kvb")))
    assert saved > 0
    # a new process (a new LLM): the next turn's prompt starts with the saved conversation
    llm = LLM(path, progress=False, block_size=4)
    monkeypatch.setattr("sys.stdin", io.StringIO("one more question\n"))
    assert run_chat(llm, params, "be brief", session=where) == 0
    err = capsys.readouterr().err
    assert "resumed session demo: 2 turns" in err
    history = __import__("json").loads((where / "history.json").read_text())
    # everything the first session prefilled for its second turn comes back from disk (whole blocks); only
    # the re-rendered last reply and the new question are computed
    turn2 = llm.tokenizer.encode_chat(history[:4])
    assert llm.kv.restored_tokens >= (len(turn2) - 1) // 4 * 4 > 0
    assert llm.kv.hit_tokens == 0  # nothing was in this fresh pool
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    with pytest.raises(UsageError, match="session name"):
        session_dir("../etc", tmp_path)


def test_preempted_sequences_come_back_from_the_host_tier(tiny_models, tmp_path):
    """Preemption frees a sequence's blocks; its full blocks stay cached, move to the host tier when the pool
    needs them, and are restored (not recomputed) when it is re-admitted: swap by cost, block by block."""
    path = tiny_models["llama_gqa_tied"].path
    prompts = [list(range(5 + 40 * i, 15 + 40 * i)) for i in range(6)]  # 10 tokens + 14 new: 6 blocks each
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    ref = LLM(path, progress=False, enable_prefix_caching=False)
    want = [ref.generate([p], params)[0].token_ids for p in prompts]
    llm = _small(path, tmp_path, kv_host_memory=64 * _per_block(path))
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert llm.engine.scheduler.counters.preemptions > 0 and llm.kv.tiers.counters.host_restores > 0
