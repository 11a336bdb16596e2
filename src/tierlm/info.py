"""`tierlm info`: architecture, parameter count and a memory table in the spirit of Tiny-LLM's."""
from __future__ import annotations

from tierlm.config import ModelConfig, format_size
from tierlm.model import registry
from tierlm.offload.estimate import SCHEMES, activation_bytes, kv_bytes, weight_bytes
from tierlm.weights.source import ModelSource

CONTEXTS = (512, 1024, 2048, 4096, 8192)
BATCHES = (1, 4, 8)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe(source: ModelSource, context: int, batch: int, dtype_bytes: int) -> str:
    cfg: ModelConfig = source.config
    stored = ", ".join(f"{k}×{v}" for k, v in sorted(source.storage_types().items(), key=lambda kv: -kv[1]))
    rope = cfg.rope_scaling.kind if cfg.rope_scaling.kind != "none" else "none"
    local = (f", local layers: window {cfg.local_window}, θ={cfg.local_rope_theta:g}, every {cfg.global_every}th "
             "global") if cfg.global_every else ""
    lines = [
        f"model        {source.path}",
        f"format       {source.format} ({stored})",
        f"architecture {cfg.arch}{' — ' + cfg.name if cfg.name else ''}",
        f"parameters   {_params(registry.param_count(cfg))} ({registry.param_count(cfg):,})",
        f"shape        {cfg.num_layers} layers, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, "
        f"heads {cfg.num_heads} (kv {cfg.num_kv_heads}, dim {cfg.head_dim}), vocab {cfg.vocab_size}",
        f"context      {cfg.max_position_embeddings} (rope θ={cfg.rope_theta:g}, scaling {rope}"
        f"{', sliding window ' + str(cfg.sliding_window) if cfg.sliding_window else ''}{local})",
        f"embeddings   {'tied' if cfg.tie_word_embeddings else 'untied'}"
        f"{', q/k/v biases' if cfg.attention_bias else ''}",
        "",
        "weights",
    ]
    w = {s: weight_bytes(cfg, s) for s in SCHEMES}
    rows = [["per layer", *(format_size(w[s].per_layer) for s in SCHEMES)],
            [f"layers ×{cfg.num_layers}", *(format_size(w[s].layers) for s in SCHEMES)],
            ["embedding", *(format_size(w[s].embed) for s in SCHEMES)],
            ["lm_head", *("tied" if cfg.tie_word_embeddings else format_size(w[s].lm_head) for s in SCHEMES)],
            ["total", *(format_size(w[s].total) for s in SCHEMES)]]
    lines += [_table(["", *SCHEMES], rows), ""]

    dname = {4: "fp32", 2: "bf16", 1: "int8"}[dtype_bytes]
    lines.append(f"KV cache ({dname}; {format_size(cfg.kv_bytes_per_token(dtype_bytes))} per token)")
    rows = [[str(c), *(format_size(kv_bytes(cfg, c, b, dtype_bytes)) for b in BATCHES)] for c in CONTEXTS]
    lines += [_table(["context", *(f"batch {b}" for b in BATCHES)], rows), ""]

    a = activation_bytes(cfg, context, batch, dtype_bytes)
    lines.append(f"activation buffers (prefill of {context} tokens, batch {batch}, {dname})")
    rows = [["hidden  [B,S,H]×2", format_size(a.hidden)], ["qkv     [B,S,(nh+2nkv)·hd]", format_size(a.qkv)],
            ["attn    [B,S,nh·hd]", format_size(a.attn_out)], ["ffn     [B,S,I]×2", format_size(a.ffn)],
            ["logits  [B,V] fp32", format_size(a.logits)], ["total", format_size(a.total)]]
    lines += [_table(["buffer", "size"], rows), ""]

    kv = kv_bytes(cfg, context, batch, dtype_bytes)
    lines.append(f"total needed (context {context}, batch {batch}, KV and activations {dname})")
    rows = [[s, format_size(w[s].total), format_size(kv), format_size(a.total), format_size(w[s].total + kv + a.total)]
            for s in SCHEMES]
    lines.append(_table(["weights", "weights", "KV", "activations", "total"], rows))
    return "\n".join(lines)
