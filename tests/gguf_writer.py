"""Write a GGUF file from a Hugging Face model (any architecture model/registry.py knows) the way llama.cpp's
convert_hf_to_gguf.py does.

Only what the tests need: metadata keys, gpt2-style tokenizer from a tokenizer.json, llama.cpp tensor names and
the q/k row permutation of arch "llama" (both as tierlm's model declares them: model/llama.py),
`rope_freqs.weight` for llama3 rope scaling, and every 2-D weight matrix quantised to one GGML type with gguf-py
(1-D norms and biases stay F32).

`quantize_roundtrip(w, qtype)` is the exact rounding the file stores, for building an oracle.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from tierlm.model import registry
from tierlm.weights.names import file_name, file_tensors
from tierlm.weights.safetensors import config_from_hf

Q = GGMLQuantizationType

# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _UNUSED = 1, 3, 5


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf LlamaModel.permute (rotate-half -> interleaved rope row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_roundtrip(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """What a reader gets back for `w` stored as `qtype`: fp32, same shape."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    return dequantize(quantize(w, qtype), qtype).astype(np.float32).reshape(w.shape)


def llama3_rope_factors(cfg) -> np.ndarray:
    """[head_dim/2] divisors of the inverse frequencies, as convert_hf_to_gguf generate_extra_tensors.

    (llama.cpp reads original_max_position_embeddings from the top-level hparams with a default of 8192;
    here it is taken from the rope parameters, which is what HF uses for the same config.)
    """
    rp = _rope_params(cfg)
    base = float(rp.get("rope_theta", 10000.0))
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _rope_params(cfg) -> dict:
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


def _tokenizer_meta(tokenizer_dir: Path, vocab_size: int) -> dict:
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tc_path = tokenizer_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    special = set()
    for at in tj.get("added_tokens", []):
        vocab[at["content"]] = at["id"]
        if at.get("special"):
            special.add(at["content"])
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # pad like get_vocab_base: "[PAD{i}]", UNUSED
        if i in by_id:
            tokens.append(by_id[i])
            types.append(_CONTROL if by_id[i] in special else _NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]

    def tok_str(v):
        return v.get("content") if isinstance(v, dict) else v

    bos, eos = tok_str(tc.get("bos_token")), tok_str(tc.get("eos_token"))
    return {"tokens": tokens, "types": types, "merges": merges,
            "bos": vocab.get(bos) if bos else None, "eos": vocab.get(eos) if eos else None,
            "add_bos": bool(tc.get("add_bos_token", False))}


def write_gguf(hf_model, tokenizer_dir: str | Path, out_path: str | Path,
               qtype: GGMLQuantizationType = Q.F32) -> Path:
    cfg = hf_model.config
    arch = registry.gguf_written_as(cfg.model_type)
    out_path = Path(out_path)
    config = config_from_hf(cfg.to_dict(), out_path)  # tierlm's reading of it: which tensors a file holds
    model = registry.for_config(config)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head

    w = GGUFWriter(str(out_path), arch)
    w.add_name(out_path.stem)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(config.rope_theta)  # as tierlm reads the config (Gemma 3: the global layers' base)
    if config.rope_scaling.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling.factor)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    for key, value in model.gguf_metadata(config).items():  # the architecture's own keys (Gemma's window, ...)
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"{arch}.{key}", value)

    tm = _tokenizer_meta(Path(tokenizer_dir), cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # the tokenizers the tests build split as GPT-2 (ByteLevel's regex)
    w.add_token_list(tm["tokens"])
    w.add_token_types(tm["types"])
    w.add_token_merges(tm["merges"])
    if tm["bos"] is not None:
        w.add_bos_token_id(tm["bos"])
    if tm["eos"] is not None:
        w.add_eos_token_id(tm["eos"])
    w.add_add_bos_token(tm["add_bos"])

    def add(name: str, t: torch.Tensor) -> None:
        a = t.detach().to(torch.float32).cpu().numpy()
        if a.ndim == 2:
            w.add_tensor(name, quantize(np.ascontiguousarray(a), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))

    sd = hf_model.state_dict()
    for layer, t in file_tensors(model, config, "gguf"):  # the tensor names and order are the model's declaration
        gg_name, hf_name = file_name("gguf", t, layer), file_name("hf", t, layer)
        if hf_name is None:  # not an HF tensor: llama3's rope factors
            w.add_tensor(gg_name, llama3_rope_factors(cfg))
            continue
        if hf_name not in sd:
            continue
        a = sd[hf_name]
        if arch in model.PERMUTED_QK_ARCHS and t.gguf_permuted:
            a = torch.from_numpy(permute(a.float().numpy(), a.shape[0] // head_dim))
        if t.hf_shift:  # Gemma's norms: the converter stores 1 + w
            a = a.float() + t.hf_shift
        add(gg_name, a)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
