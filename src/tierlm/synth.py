"""`tierlm synth`: random-weight models at real shapes, for benchmarks and tests; this file owns the presets
and dispatches on the format.

Nothing is downloaded: the config comes from a preset and weights are seeded N(0, 0.02) (norms 1).
--format hf (default): a Hugging Face safetensors directory; the tokenizer is a byte-level BPE with the
preset's vocabulary size (256 byte tokens, BOS/EOS, then fillers). The output is written into OUT.partial/ and
renamed to OUT only when complete.
--format gguf: one GGUF file quantised to --quant, loadable by llama.cpp and tierlm, with SmolLM2's tokenizer
(so a 49152-token vocabulary, whatever the preset's); see synth_gguf.py.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from tierlm.config import STORAGE_DTYPES
from tierlm.errors import UsageError
from tierlm.model import registry
from tierlm.progress import progress_bar
from tierlm.synth_gguf import QUANTS, write_synth_gguf
from tierlm.weights.names import file_name, file_tensors
from tierlm.weights.safetensors import config_from_hf
from tierlm.weights.safetensors_writer import TensorSpec, shard, write_shard

_SMOLLM2 = dict(model_type="llama", vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                max_position_embeddings=8192, tie_word_embeddings=True)
_QWEN25 = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768)
_LLAMA2 = dict(model_type="llama", vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=4096, tie_word_embeddings=False)
_GEMMA3 = dict(model_type="gemma3_text", vocab_size=262144, head_dim=256, query_pre_attn_scalar=256,
               sliding_window=512, sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
               rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
               hidden_activation="gelu_pytorch_tanh")
PRESETS: dict[str, dict] = {
    "smollm2-135m": {**_SMOLLM2, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3},
    "smollm2-360m": {**_SMOLLM2, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5},
    "tinyllama-1.1b": {**_LLAMA2, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048},
    "llama-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=32768, sliding_window=4096,
                       tie_word_embeddings=False),
    "qwen2.5-0.5b": {**_QWEN25, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN25, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "tie_word_embeddings": False},
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                       tie_word_embeddings=True),
    "gemma3-270m": {**_GEMMA3, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                    "num_attention_heads": 4, "num_key_value_heads": 1},
    "gemma3-1b": {**_GEMMA3, "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                  "num_attention_heads": 4, "num_key_value_heads": 1},
    "phi3-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=4096, sliding_window=2047,
                      tie_word_embeddings=False),
}
BOS, EOS = "<s>", "</s>"


def tensor_specs(cfg: dict, dtype: torch.dtype) -> list[TensorSpec]:
    """HF tensor names and shapes for a preset's config (as its model declares them), in checkpoint order."""
    config = config_from_hf(cfg, Path(cfg["model_type"]))
    return [TensorSpec(file_name("hf", t, layer), t.shape(config), dtype)
            for layer, t in file_tensors(registry.for_config(config), config, "hf")]


def _tokenizer(vocab_size: int) -> HFTokenizer:
    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {t: n for n, t in enumerate([*byte_chars, BOS, EOS])}
    vocab.update({f"<synth_{n}>": n for n in range(len(vocab), vocab_size)})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


FORMATS = ("hf", "gguf")


def synth(preset: str, out: Path, dtype: str = "bfloat16", seed: int = 0, max_shard_bytes: int = 2 << 30,
          force: bool = False, progress: bool | None = None, fmt: str = "hf", quant: str | None = None,
          overrides: dict | None = None) -> Path:
    """overrides: preset fields to change (e.g. fewer layers for a quick test)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    if fmt == "gguf":
        return _synth_gguf(preset, out, quant or "q4_1", seed, force, progress, overrides)
    if quant is not None:
        raise UsageError("--quant is for --format gguf (an HF synth is stored in --dtype)")
    if dtype not in STORAGE_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} ({', '.join(STORAGE_DTYPES)})")
    tdtype = STORAGE_DTYPES[dtype]
    if out.exists() and not force:
        raise UsageError(f"{out} already exists (pass --force to replace it)")
    model_type = PRESETS[preset]["model_type"]
    cfg = {**PRESETS[preset], **(overrides or {}), "torch_dtype": str(tdtype).removeprefix("torch."),
           "bos_token_id": 256, "eos_token_id": 257,
           "architectures": [registry.for_hf(model_type).HF_CLASSES[model_type]]}
    config_from_hf(cfg, out)  # validate the preset with the same code that will load it
    specs = tensor_specs(cfg, tdtype)
    shards = shard(specs, max_shard_bytes)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    gen = torch.Generator().manual_seed(seed)
    bar = progress_bar(sum(s.nbytes for s in specs), f"synth {preset}", progress, unit="B")
    bar.unit_scale = True

    def make(s: TensorSpec) -> torch.Tensor:
        if len(s.shape) == 1:  # norms 1, biases small noise
            return (torch.ones(s.shape) if "norm" in s.name else torch.randn(s.shape, generator=gen) * 0.02).to(s.dtype)
        return (torch.randn(s.shape, generator=gen) * 0.02).to(s.dtype)

    for name, group in zip(names, shards):
        write_shard(partial / name, group, make, on_tensor=lambda s: bar.update(s.nbytes),
                    metadata={"format": "pt", "tierlm_synth": preset, "seed": str(seed)})
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: n for n, g in zip(names, shards) for s in g}}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (partial / "config.json").write_text(json.dumps(cfg, indent=1))
    _tokenizer(cfg["vocab_size"]).save(str(partial / "tokenizer.json"))
    (partial / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def _synth_gguf(preset: str, out: Path, quant: str, seed: int, force: bool, progress: bool | None,
                overrides: dict | None) -> Path:
    if quant not in QUANTS:
        raise UsageError(f"unknown quant {quant!r} for --format gguf ({', '.join(QUANTS)})")
    if out.is_dir():
        raise UsageError(f"{out} is a directory (--format gguf writes one file)")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists (pass --force to replace it)")
    cfg = {**PRESETS[preset], **(overrides or {})}
    config_from_hf(cfg, out)  # validate the preset (and overrides) with the same code as the HF loader
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_synth_gguf(cfg, preset, out, quant, seed, progress)
