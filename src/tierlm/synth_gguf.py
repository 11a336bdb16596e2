"""`tierlm synth --format gguf`: a random-weight GGUF at a preset's real shapes, for llama.cpp and tierlm alike.

Benchmarks hand the very same file to llama.cpp (llama-cpp-python) and to tierlm, so it is laid out as
llama.cpp's convert_hf_to_gguf writes it: the same architecture keys, tensor names and [out, in] shapes, every
2-D matrix in the requested GGML type and 1-D norms/biases in F32. Mistral is written as arch "llama" (as the
converter does); llama3 rope scaling becomes a `rope_freqs.weight` tensor.

The tokenizer is SmolLM2's, copied key by key with the stored value types from the embedded model's GGUF, so
token ids mean the same thing in both engines and the vocabulary is SmolLM2's 49152 whatever the preset says;
every other dimension is the preset's. Weights are seeded N(0, 0.02) (norms 1) and generated and quantised a
chunk of rows at a time straight into the file: memory holds a few chunks, never the model.
"""
from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

from tierlm.config import format_size
from tierlm.errors import UsageError
from tierlm.model import registry
from tierlm.progress import progress_bar
from tierlm.weights.embedded import embedded_model_path
from tierlm.weights.gguf_file import GGUFFile
from tierlm.weights.gguf_writer import GGUFTensorSpec, write_gguf
from tierlm.weights.names import file_name, file_tensors
from tierlm.weights.safetensors import config_from_hf

Q = GGMLQuantizationType
# q5_0: a file that runs in its own blocks (quant/ggml.py; gguf-py quantises no K-quant), as Q4_K_M files do
QUANTS = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q8_0": Q.Q8_0}
_FILE_TYPES = {Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1, Q.Q5_0: LlamaFileType.MOSTLY_Q5_0,
               Q.Q8_0: LlamaFileType.MOSTLY_Q8_0}
# Weights generated and quantised per step: 4M (16 MiB fp32; quantize's temporaries are a few times that).
CHUNK_ELEMENTS = 1 << 22
STD = 0.02


def tokenizer_metadata() -> tuple[dict, dict]:
    """SmolLM2's tokenizer.* keys from the embedded GGUF: ({key: value}, {key: (type, item type)})."""
    f = GGUFFile(embedded_model_path())
    try:
        keys = [k for k in f.metadata if k.startswith("tokenizer.")]
        return {k: f.metadata[k] for k in keys}, {k: f.value_types[k] for k in keys}
    finally:
        f.close()


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def gguf_specs(cfg: dict, qtype: GGMLQuantizationType) -> list[GGUFTensorSpec]:
    """llama.cpp tensor names and shapes for an HF-style config (as its model declares them), layer by layer:
    matrices in `qtype`, norms, biases and rope factors in F32."""
    config = config_from_hf(cfg, Path(cfg["model_type"]))
    return [GGUFTensorSpec(file_name("gguf", t, layer), t.shape(config), qtype if t.matrix else Q.F32)
            for layer, t in file_tensors(registry.for_config(config), config, "gguf")]


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """[head_dim/2] divisors of the inverse frequencies, as convert_hf_to_gguf's generate_extra_tensors."""
    rs, hd = cfg["rope_scaling"], head_dim(cfg)
    freqs = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    factor, low, high = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _metadata(cfg: dict, name: str, qtype: GGMLQuantizationType, seed: int, tok: tuple[dict, dict]):
    def add(w: GGUFWriter) -> None:
        w.add_type("model")
        w.add_name(name)
        w.add_description(f"random weights N(0, {STD}), seed {seed}, written by tierlm synth")
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_rope_freq_base(float(cfg["rope_theta"]))
        w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
        w.add_file_type(_FILE_TYPES[qtype])
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(head_dim(cfg))
        config = config_from_hf(cfg, Path(cfg["model_type"]))
        for key, value in registry.for_config(config).gguf_metadata(config).items():  # the architecture's own keys
            (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"{w.arch}.{key}", value)
        values, types = tok
        for key, value in values.items():
            vtype, item = types[key]
            w.add_key_value(key, value, vtype, sub_type=item)
        w.add_quantization_version(GGML_QUANT_VERSION)
    return add


def _weights(cfg: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def data(s: GGUFTensorSpec) -> Iterator[np.ndarray]:
        if s.name == "rope_freqs.weight":
            yield llama3_rope_factors(cfg).view(np.uint8)
        elif "norm" in s.name:
            yield np.ones(s.shape, np.float32).view(np.uint8)
        elif len(s.shape) == 1:  # biases: small noise
            yield (torch.randn(s.shape, generator=gen) * STD).numpy().view(np.uint8)
        else:
            cols = s.shape[-1]
            step = max(1, CHUNK_ELEMENTS // cols)
            for start in range(0, s.rows, step):
                w = torch.randn(min(step, s.rows - start), cols, generator=gen).mul_(STD).numpy()
                yield quantize(w, s.qtype)
    return data


def write_synth_gguf(cfg: dict, name: str, out: Path, quant: str, seed: int = 0, progress: bool | None = None) -> Path:
    """cfg: an HF-style preset (validated by the caller); its vocab_size is replaced by SmolLM2's."""
    qtype = QUANTS[quant]
    tok = tokenizer_metadata()
    cfg = {**cfg, "vocab_size": len(tok[0]["tokenizer.ggml.tokens"])}
    specs = gguf_specs(cfg, qtype)
    need, free = sum(s.nbytes for s in specs), shutil.disk_usage(out.parent).free
    if need + (64 << 20) > free:  # fail now, not after minutes of writing
        raise UsageError(f"{out.parent}: not enough free space ({format_size(free)}, need {format_size(need)})")
    bar = progress_bar(need, f"synth {name} {quant}", progress, unit="B")
    bar.unit_scale = True
    try:
        arch = registry.gguf_written_as(cfg["model_type"])  # Mistral as "llama", as llama.cpp's converter
        return write_gguf(out, arch, _metadata(cfg, name, qtype, seed, tok), specs, _weights(cfg, seed),
                          on_bytes=bar.update)
    finally:
        bar.close()

