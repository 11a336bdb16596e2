"""`tierlm synth`: real shapes, loadable by tierlm and by transformers, atomic, sharded, seeded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tierlm import LLM, UsageError
from tierlm.cli import main
from tierlm.kvcache.contiguous import KVCache
from tierlm.synth import PRESETS, synth, tensor_specs
from tierlm.weights.safetensors import config_from_hf
from tierlm.weights.safetensors_writer import TensorSpec, shard, write_shard


def test_writer_round_trip(tmp_path):
    specs = [TensorSpec("a", (3, 4), torch.float32), TensorSpec("b", (5,), torch.bfloat16),
             TensorSpec("c", (2, 2), torch.float16)]
    data = {s.name: torch.randn(s.shape).to(s.dtype) for s in specs}
    write_shard(tmp_path / "x.safetensors", specs, lambda s: data[s.name])
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(data)
        for k, v in data.items():
            assert torch.equal(f.get_tensor(k), v)
    assert not list(tmp_path.glob("*.tmp"))


def test_shard_split_keeps_order_and_limit():
    specs = [TensorSpec(str(i), (100,), torch.float32) for i in range(10)]  # 400 B each
    groups = shard(specs, 1000)
    assert [s.name for g in groups for s in g] == [s.name for s in specs]
    assert all(sum(s.nbytes for s in g) <= 1000 for g in groups) and len(groups) == 5


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_have_real_shapes(preset):
    cfg = config_from_hf(PRESETS[preset], Path(preset))
    n = sum(torch.Size(s.shape).numel() for s in tensor_specs(PRESETS[preset], torch.bfloat16))
    assert n == cfg.param_count()
    expected = {"smollm2-135m": 134.5e6, "tinyllama-1.1b": 1.10e9, "llama-7b": 6.74e9, "llama-13b": 13.0e9,
                "llama3-8b": 8.03e9, "mistral-7b": 7.24e9, "qwen2.5-0.5b": 0.494e9}
    if preset in expected:
        assert abs(n - expected[preset]) / expected[preset] < 0.01


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "smollm2"
    synth("smollm2-135m", out, dtype="bfloat16", seed=3, max_shard_bytes=100 << 20, progress=False)
    return out


def test_synth_is_sharded_and_matches_transformers(synth_dir):
    from transformers import AutoModelForCausalLM

    index = json.loads((synth_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    llm = LLM(synth_dir, dtype="float32", progress=False)
    assert llm.config.param_count() == 134_515_008
    hf = AutoModelForCausalLM.from_pretrained(synth_dir, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode("random weights, real shapes")
    kv = KVCache(llm.config, 1, len(ids), torch.float32)
    ours = llm.runner.forward(torch.tensor([ids]), kv, all_logits=True)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-3


def test_synth_is_seeded_and_refuses_to_overwrite(synth_dir, tmp_path):
    again = synth("smollm2-135m", tmp_path / "again", dtype="bfloat16", seed=3, max_shard_bytes=100 << 20,
                  progress=False)
    name = "model-00001-of-00003.safetensors"
    assert (again / name).read_bytes() == (synth_dir / name).read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        synth("smollm2-135m", again, progress=False)


def test_interrupted_synth_leaves_no_output(tmp_path, monkeypatch):
    import tierlm.synth as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "write_shard", boom)
    with pytest.raises(OSError):
        synth("smollm2-135m", tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_synth_cli_errors(capsys, tmp_path):
    assert main(["synth", "--preset", "gpt-5", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err
