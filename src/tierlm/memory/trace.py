"""`--memory-trace FILE`: the ledger's events as a Chrome-trace / Perfetto JSON, and
`tierlm memory-timeline FILE -o out.png`: a stacked area of reserved bytes by owner and tier over time.

Trace format (https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSl85rXcU3M): one counter
track per tier ("ph": "C", args = bytes by owner after each event), usage tracks ("kv_used"), and instant
events ("ph": "i") for evictions and pressure changes. Written atomically (temp file, then rename).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tierlm.errors import UsageError
from tierlm.memory.ledger import LedgerEvent

RESERVATION_KINDS = ("reserve", "resize", "release")


def chrome_trace(events: list[LedgerEvent]) -> dict:
    held: dict[str, dict[str, int]] = {}  # tier -> owner -> bytes
    out = []
    for e in events:
        ts = round(e.t * 1e6, 1)
        if e.kind in RESERVATION_KINDS:
            tier = held.setdefault(e.tier, {})
            tier[e.owner] = e.nbytes  # one reservation per owner and tier in practice; a release leaves 0
            out.append({"name": f"reserved {e.tier}", "ph": "C", "ts": ts, "pid": 1, "args": dict(tier)})
        elif e.kind == "usage":
            out.append({"name": f"{e.owner} {e.tier}", "ph": "C", "ts": ts, "pid": 1, "args": {e.owner: e.nbytes}})
        else:
            out.append({"name": e.kind, "ph": "i", "s": "p", "ts": ts, "pid": 1,
                        "args": {"owner": e.owner, "tier": e.tier, "bytes": e.nbytes}})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": {"producer": "tierlm memory ledger"}}


def write_trace(events: list[LedgerEvent], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(chrome_trace(events)))
    os.replace(tmp, path)


def plot_timeline(trace_path: str | Path, out: str | Path) -> None:
    """Stacked area of reserved bytes by owner (one panel per tier), usage as lines, events as ticks."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("memory-timeline needs matplotlib (pip install matplotlib)") from None
    try:
        events = json.loads(Path(trace_path).read_text())["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{trace_path}: not a tierlm memory trace ({e})") from None
    tiers = sorted({ev["name"].removeprefix("reserved ") for ev in events if ev["name"].startswith("reserved ")})
    if not tiers:
        raise UsageError(f"{trace_path}: no reservations in the trace")
    fig, axes = plt.subplots(len(tiers), 1, figsize=(10, 3.5 * len(tiers)), squeeze=False)
    for ax, tier in zip(axes[:, 0], tiers):
        series = [ev for ev in events if ev["name"] == f"reserved {tier}"]
        end = max(ev["ts"] for ev in events)
        if series[-1]["ts"] < end:  # what is still reserved lasts to the end of the trace
            series.append({**series[-1], "ts": end})
        owners = sorted({o for ev in series for o in ev["args"]})
        xs = [ev["ts"] / 1e6 for ev in series]
        ys = [[ev["args"].get(o, 0) / 2**20 for ev in series] for o in owners]
        ax.stackplot(xs, ys, labels=owners, step="post", alpha=0.8)
        for name in sorted({ev["name"] for ev in events if ev.get("ph") == "C" and ev["name"].endswith(f" {tier}")
                            and not ev["name"].startswith("reserved")}):
            pts = [(ev["ts"] / 1e6, next(iter(ev["args"].values())) / 2**20) for ev in events if ev["name"] == name]
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="black", lw=1, label=name)
        for ev in events:
            if ev.get("ph") == "i":
                ax.axvline(ev["ts"] / 1e6, color="red", lw=0.3, alpha=0.5)
        ax.set_title(f"{tier}: reserved bytes by owner (red: {', '.join(sorted({e['name'] for e in events if e.get('ph') == 'i'})) or 'no events'})")
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
