"""Write a GGUF file from a Hugging Face Llama/Mistral/Qwen2 model the way llama.cpp's convert_hf_to_gguf.py does.

Only what the tests need: metadata keys, gpt2-style tokenizer from a tokenizer.json, llama.cpp tensor names,
the q/k row permutation of arch "llama", `rope_freqs.weight` for llama3 rope scaling, and every 2-D weight
matrix quantised to one GGML type with gguf-py (1-D norms and biases stay F32).

`quantize_roundtrip(w, qtype)` is the exact rounding the file stores, for building an oracle.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

Q = GGMLQuantizationType

# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _UNUSED = 1, 3, 5

_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # llama.cpp converts Mistral as "llama"
_PERMUTED = {"llama"}

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


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
    arch = _ARCH[cfg.model_type]
    out_path = Path(out_path)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rp = _rope_params(cfg)

    w = GGUFWriter(str(out_path), arch)
    w.add_name(out_path.stem)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)

    tm = _tokenizer_meta(Path(tokenizer_dir), cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
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

    if rp.get("rope_type", rp.get("type")) == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))

    sd = hf_model.state_dict()
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf_name, gg_name in _LAYER.items():
            if prefix + hf_name not in sd:
                continue
            t = sd[prefix + hf_name]
            if arch in _PERMUTED and hf_name.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = n_head if "q_proj" in hf_name else n_kv
                t = torch.from_numpy(permute(t.float().numpy(), heads))
            add(f"blk.{i}.{gg_name}", t)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
