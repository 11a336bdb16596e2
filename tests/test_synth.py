"""`tierlm synth`: real shapes, loadable by tierlm and by transformers, atomic, sharded, seeded."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tierlm import LLM, UsageError
from tierlm.cli import main
from tierlm.model import registry
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
    assert n == registry.param_count(cfg)
    expected = {"smollm2-135m": 134.5e6, "tinyllama-1.1b": 1.10e9, "llama-7b": 6.74e9, "llama-13b": 13.0e9,
                "llama3-8b": 8.03e9, "mistral-7b": 7.24e9, "qwen2.5-0.5b": 0.494e9, "qwen3-0.6b": 0.596e9,
                "gemma3-270m": 0.268e9, "gemma3-1b": 1.0e9, "phi3-mini": 3.82e9}
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
    assert registry.param_count(llm.config) == 134_515_008
    hf = AutoModelForCausalLM.from_pretrained(synth_dir, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode("random weights, real shapes")
    ours = llm.prompt_logits(ids)  # [T, V], through the engine
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


# --- --format gguf: one file for llama.cpp and tierlm alike -----------------------------------------------

SMALL = {"num_hidden_layers": 2}  # smollm2-135m's shapes, 2 of its 30 layers: ~24 MB, about a second


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gguf_specs_have_real_shapes(preset):
    from tierlm.synth_gguf import QUANTS, gguf_specs

    cfg = {**PRESETS[preset], "vocab_size": 49152}
    specs = gguf_specs(cfg, QUANTS["q4_1"])
    n = sum(torch.Size(s.shape).numel() for s in specs if s.name != "rope_freqs.weight")
    assert n == registry.param_count(config_from_hf(cfg, Path(preset)))
    assert ("rope_freqs.weight" in {s.name for s in specs}) == (preset == "llama3-8b")
    assert all(s.qtype.name == ("Q4_1" if len(s.shape) == 2 else "F32") for s in specs)
    assert all(s.nbytes for s in specs)  # every row is whole blocks of 32


@pytest.fixture(scope="module")
def gguf_q4_1(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "smollm2.gguf"
    return synth("smollm2-135m", out, seed=3, progress=False, fmt="gguf", quant="q4_1", overrides=SMALL)


def test_gguf_synth_opens_with_preset_shapes_and_smollm2_tokenizer(gguf_q4_1):
    from tierlm.weights import open_model

    src, ref = open_model(gguf_q4_1), open_model(None)  # the embedded SmolLM2 GGUF
    cfg, p = src.config, PRESETS["smollm2-135m"]
    assert (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.max_position_embeddings, cfg.rope_theta, cfg.tie_word_embeddings) == (
        "llama", 49152, p["hidden_size"], p["intermediate_size"], 2, p["num_attention_heads"],
        p["num_key_value_heads"], p["max_position_embeddings"], p["rope_theta"], True)
    assert src.storage_types() == {"Q4_1": 1 + 7 * 2, "F32": 1 + 2 * 2}
    assert src.meta["general.file_type"] == 3 and src.meta["general.architecture"] == "llama"
    # The tokenizer keys are SmolLM2's, with the very value types llama.cpp checks (token ids uint32, ...).
    tok_keys = [k for k in ref.meta if k.startswith("tokenizer.")]
    assert {k: src.meta[k] for k in tok_keys} == {k: ref.meta[k] for k in tok_keys}
    assert {k: src._file.value_types[k] for k in tok_keys} == {k: ref._file.value_types[k] for k in tok_keys}
    text = "Random weights, real shapes."
    assert src.tokenizer.encode(text) == ref.tokenizer.encode(text)
    w = src.load("layers.1.w_down", torch.float32)
    assert w.shape == (p["hidden_size"], p["intermediate_size"]) and 0.018 < w.std().item() < 0.022
    assert torch.equal(src.load("layers.0.attn_norm", torch.float32), torch.ones(p["hidden_size"]))
    src.close()
    ref.close()


def test_gguf_synth_generates_and_is_seeded(gguf_q4_1, tmp_path):
    from tierlm import SamplingParams

    llm = LLM(gguf_q4_1, dtype="float32", progress=False)
    out = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    again = synth("smollm2-135m", tmp_path / "again.gguf", seed=3, progress=False, fmt="gguf", quant="q4_1",
                  overrides=SMALL)
    assert again.read_bytes() == gguf_q4_1.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        synth("smollm2-135m", again, fmt="gguf", progress=False)


def test_gguf_q4_0_loads_as_int4(tmp_path):
    from tierlm import SamplingParams
    from tierlm.quant import QuantBlocks, QuantScheme, from_blocks
    from tierlm.weights import open_model

    path = synth("smollm2-135m", tmp_path / "q4_0.gguf", progress=False, fmt="gguf", quant="q4_0",
                 overrides={"num_hidden_layers": 1})
    src = open_model(path)
    assert src.storage_types() == {"Q4_0": 8, "F32": 3}
    blocks = src.load_blocks("layers.0.w_up", QuantScheme("int4", 32))  # Q4_0 blocks are int4 g=32 as stored
    assert torch.equal(from_blocks(QuantBlocks.concat([blocks])).dequantize(), src.load("layers.0.w_up", torch.float32))
    src.close()
    # (Most of this test's time is tierlm requantising the 49152-row tied head to int8 per channel.)
    llm = LLM(path, quant="int4", progress=False)
    out = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_gguf_synth_leaves_no_file(tmp_path, monkeypatch, error):
    import tierlm.synth_gguf as mod

    real, calls = mod.quantize, []

    def failing_quantize(w, qtype):
        calls.append(1)
        if len(calls) == 3:  # mid-write: the header and two chunks are on disk by now
            raise error
        return real(w, qtype)

    monkeypatch.setattr(mod, "quantize", failing_quantize)
    with pytest.raises(type(error)):
        synth("smollm2-135m", tmp_path / "m.gguf", progress=False, fmt="gguf", quant="q8_0", overrides=SMALL)
    assert list(tmp_path.iterdir()) == []


def test_gguf_synth_cli_errors(capsys, tmp_path):
    assert main(["synth", "--preset", "llama-7b", "--format", "gguf", "--quant", "q5_k", str(tmp_path / "x")]) == 2
    assert "invalid choice: 'q5_k'" in capsys.readouterr().err
    assert main(["synth", "--preset", "gpt-5", "--format", "gguf", str(tmp_path / "x.gguf")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["synth", "--preset", "llama-7b", "--quant", "q4_0", str(tmp_path / "x")]) == 2
    assert "--quant is for --format gguf" in capsys.readouterr().err
    assert main(["synth", "--preset", "llama-7b", "--format", "gguf", "--dtype", "float16", str(tmp_path / "x")]) == 2
    assert "--dtype is for --format hf" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unknown quant"):
        synth("llama-7b", tmp_path / "x.gguf", fmt="gguf", quant="q2_k")
    assert list(tmp_path.iterdir()) == []


def test_gguf_synth_loads_in_llama_cpp(gguf_q4_1):
    llama_cpp = pytest.importorskip("llama_cpp")
    from tierlm.weights import open_model

    model = llama_cpp.Llama(model_path=str(gguf_q4_1), n_ctx=256, verbose=False)
    text = "Random weights, real shapes."
    ids = model.tokenize(text.encode(), add_bos=False)
    src = open_model(gguf_q4_1)
    assert ids == src.tokenizer.encode(text, add_special_tokens=False)  # same token ids in both engines
    src.close()
    model.eval(ids)
    assert model.n_tokens == len(ids) and len(model.scores[model.n_tokens - 1]) == 49152


def test_llama3_rope_factors_match_the_converter():
    from types import SimpleNamespace

    from gguf_writer import llama3_rope_factors as converter
    from tierlm.synth_gguf import llama3_rope_factors

    cfg = PRESETS["llama3-8b"]
    hf = SimpleNamespace(hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
                         rope_scaling={**cfg["rope_scaling"], "rope_theta": cfg["rope_theta"]})
    assert np.allclose(llama3_rope_factors(cfg), converter(hf), rtol=1e-6)
