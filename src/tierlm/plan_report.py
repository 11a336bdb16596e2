"""`tierlm plan`: the planner's placement as a table (and a picture with --plot)."""
from __future__ import annotations

from itertools import groupby
from pathlib import Path

from tierlm.config import ModelConfig, format_size
from tierlm.errors import UsageError
from tierlm.memory.budget import MemoryBudget
from tierlm.model import registry
from tierlm.offload.planner import Placement, PlanInput
from tierlm.offload.tier import Tier


def _unit_rows(cfg: ModelConfig, inp: PlanInput, p: Placement) -> list[tuple[str, str, str]]:
    rows = []
    if cfg.tie_word_embeddings:
        rows.append(("embed", "= head", "tied: rows read from the head's matrix" if p.head_tier != Tier.DEVICE else "tied"))
    else:
        note = "rows read on demand" if p.embed_tier != Tier.DEVICE else ""
        rows.append(("embed", p.embed_tier.value, f"{format_size(inp.embed_bytes)}  {note}".rstrip()))
    i = 0
    for tier, run in groupby(p.layer_tiers):
        n = len(list(run))
        name = f"layer {i}" if n == 1 else f"layers {i}-{i + n - 1}"
        rows.append((name, tier.value, f"{format_size(inp.layer_bytes)}" + (f" × {n}" if n > 1 else "")))
        i += n
    rows.append(("head", p.head_tier.value, format_size(inp.head_bytes)))
    return rows


def _resident_bytes(inp: PlanInput, p: Placement) -> int:
    """Resident weights: the planned compute-memory use minus ring, KV, activations and fixed buffers."""
    return p.device_bytes - p.ring_depth * p.slot_bytes - inp.kv_bytes - inp.activation_bytes - inp.fixed_bytes


def describe_plan(cfg: ModelConfig, dtype: str, budget: MemoryBudget, inp: PlanInput, p: Placement,
                  profile_note: str, max_context: int) -> str:
    rows = _unit_rows(cfg, inp, p)
    w = max(len(r[0]) for r in rows)
    lines = [f"plan for {cfg.name or cfg.arch} ({registry.param_count(cfg) / 1e9:.2f}B, {dtype}) under {budget}; "
             f"context {max_context}", f"bandwidth profile: {profile_note}", ""]
    lines += [f"{'unit'.ljust(w)}  {'tier':<7} size", f"{'-' * w}  {'-' * 7} {'-' * 20}"]
    lines += [f"{a.ljust(w)}  {b:<7} {c}" for a, b, c in rows]
    resident = _resident_bytes(inp, p)
    where = "cuda" if inp.cuda else "cpu"
    limit = inp.device_budget if inp.cuda else inp.cpu_budget
    mem = [("resident weights", resident),
           (f"ring {p.ring_depth} × {format_size(p.slot_bytes)}" if p.ring_depth else "ring (nothing streams)",
            p.ring_depth * p.slot_bytes),
           (f"KV cache (context {max_context})", inp.kv_bytes), ("activations (prefill chunk)", inp.activation_bytes),
           ("norm, rope tables, row buffer", inp.fixed_bytes)]
    lines += ["", f"memory ({where})"] + [f"  {k:<32} {format_size(v):>10}" for k, v in mem]
    lines.append(f"  {'total':<32} {format_size(p.device_bytes):>10}"
                 + (f"  of {format_size(limit)} budget" if limit is not None else ""))
    if inp.cuda:
        lines.append(f"  pinned host (HOST layers, staging) {format_size(p.host_bytes)}"
                     + (f" of {format_size(inp.cpu_budget)}" if inp.cpu_budget is not None else ""))
    moved = f"disk {format_size(p.disk_bytes_per_token)}" + (f", host->device {format_size(p.h2d_bytes_per_token)}" if inp.cuda else "")
    lines += ["", f"per token: {moved}; I/O {p.io_s * 1e3:.0f} ms, compute {p.compute_s * 1e3:.0f} ms "
              f"-> predicted {p.token_s * 1e3:.0f} ms/token ({p.tok_s:.2f} tok/s)"]
    if p.ring_depth:
        lines.append(f"streaming: ring {p.ring_depth}, {p.io_threads} I/O threads -> disk at {p.disk_gbps:.2f} GB/s "
                     f"(of {inp.disk.best_gbps:.2f} best; disk model from the profile's bytes-in-flight curve)")
    return "\n".join(lines)


def describe_context_options(options: list, chosen: int) -> str:
    """The KV-vs-weights trade behind the default context (offload/plan_input.choose_context)."""
    lines = ["context options (KV reserved for one sequence; every KV byte is a weight byte that streams):",
             f"  {'context':>8} {'KV':>10} {'resident layers':>16} {'disk/token':>11} {'predicted':>12}"]
    for o in options:
        p = o.placement
        if p is None:
            lines.append(f"  {o.context:>8} {format_size(o.kv_bytes):>10} {'does not fit the budget':>41}")
            continue
        mark = "  <- chosen" if o.context == chosen else ""
        lines.append(f"  {o.context:>8} {format_size(o.kv_bytes):>10} {p.count(Tier.DEVICE):>7} of {len(p.layer_tiers):<6} "
                     f"{format_size(p.disk_bytes_per_token):>11} {p.token_s * 1e3:>8.0f} ms{mark}")
    lines.append("  rule: the longest context whose predicted s/token is within 10% of 512 tokens' (of the fastest "
                 "option's when 512 does not fit; override: --max-context or --kv-memory)")
    return "\n".join(lines)


def describe_kv_int8(context: int, inp: PlanInput, p: Placement) -> str:
    """The same budget with int8 KV (half the bytes per token; attention reads values rounded to 8 bits)."""
    return (f"  with --kv-dtype int8 (KV halved, slightly lossy): context {context}, {format_size(inp.kv_bytes)} KV, "
            f"{p.count(Tier.DEVICE)} of {len(p.layer_tiers)} layers resident, predicted {p.token_s * 1e3:.0f} ms/token")


def plot_plan(cfg: ModelConfig, inp: PlanInput, p: Placement, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    colors = {Tier.DEVICE: "#2b8a3e", Tier.HOST: "#e67700", Tier.DISK: "#5c7cfa"}
    units = [(f"L{i}", t, inp.layer_bytes) for i, t in enumerate(p.layer_tiers)] + [("head", p.head_tier, inp.head_bytes)]
    if inp.embed_bytes:
        units.insert(0, ("embed", p.embed_tier, inp.embed_bytes))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [4, 1]})
    ax1.bar(range(len(units)), [u[2] / 2**20 for u in units], color=[colors[u[1]] for u in units])
    ax1.set_xticks(range(len(units)), [u[0] for u in units], rotation=90, fontsize=7)
    ax1.set_ylabel("MiB")
    ax1.set_title(f"{cfg.name or cfg.arch}: tier of each unit; predicted {p.token_s * 1e3:.0f} ms/token")
    for tier, c in colors.items():
        ax1.bar(0, 0, color=c, label=tier.value)
    ax1.legend()
    parts = [("resident", _resident_bytes(inp, p)),
             ("ring", p.ring_depth * p.slot_bytes), ("KV", inp.kv_bytes), ("act+fixed", inp.activation_bytes + inp.fixed_bytes)]
    bottom = 0.0
    for name, b in parts:
        ax2.bar(0, b / 2**20, bottom=bottom, label=name)
        bottom += b / 2**20
    limit = inp.device_budget if inp.cuda else inp.cpu_budget
    if limit is not None:
        ax2.axhline(limit / 2**20, color="red", linestyle="--", label="budget")
    ax2.set_xticks([])
    ax2.set_ylabel("MiB")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
