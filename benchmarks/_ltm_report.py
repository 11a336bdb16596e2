"""The larger-than-memory benchmark's report: per-run progress lines, the summary of all rounds per (engine, cap)
(medians, rooflines, ratios to llama.cpp, greedy-token agreement), the printed tables and the JSON result.
Used by the driver, benchmarks/larger_than_memory.py."""
from __future__ import annotations

import os
import statistics

from _ltm_engines import ENGINES, REFERENCE

GiB = 1 << 30


def _s_per_token(g: dict) -> float:
    return g["decode_s"] / g["decode_tokens"] if g["decode_tokens"] else float("nan")


def _bytes_per_token(engine: str, g: dict) -> float:
    """tierlm: its own disk counter; llama.cpp: /proc/self/io read_bytes. Per forward pass."""
    n = max(g["forward_passes"], 1)
    own = g["disk_bytes"] if ENGINES[engine].kind == "tierlm" else g["proc_read_bytes"]
    return own / n


def progress_line(rec: dict, fmt) -> str:
    cap = "no cap" if rec["cap"] is None or not ENGINES[rec["engine"]].capped else f"cap {fmt(rec['cap'])}"
    if rec["cap"] is not None and "cgroup" not in rec:
        cap += " (not enforced)"
    s = f"round {rec['round']} {rec['engine']:<21} {cap:<13} disk {rec['disk_gbps']:.2f} GB/s: {rec['status']}"
    if rec["result"] and rec["result"]["gens"]:
        g = rec["result"]["gens"]
        s += (f", {statistics.median(_s_per_token(x) for x in g):.3f} s/token, "
              f"{statistics.median(_bytes_per_token(rec['engine'], x) for x in g) / GiB:.3f} GiB/token, "
              f"peak RSS {fmt(rec['result']['peak_rss'])}")
    if "cgroup" in rec:
        s += f", cgroup peak {fmt(rec['cgroup']['peak'])}, oom_kill {rec['cgroup']['oom_kills']}"
    return s + f" ({rec['wall_s']:.0f} s)"


def summarize(runs: list[dict]) -> dict:
    """(engine, cap) -> medians and maxima over its counted generations / runs."""
    groups: dict[tuple, list[dict]] = {}
    for rec in runs:
        key = (rec["engine"], rec["cap"] if ENGINES[rec["engine"]].capped else None)
        groups.setdefault(key, []).append(rec)
    out = {}
    for (engine, cap), recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        gens = [g for r in ok for g in r["result"]["gens"]]
        cgs = [r["cgroup"] for r in recs if "cgroup" in r]
        row = {"engine": engine, "cap": cap, "budget": recs[0]["budget"], "runs": len(recs), "runs_ok": len(ok),
               "statuses": sorted({r["status"] for r in recs}), "gens_counted": len(gens),
               "disk_gbps": statistics.median(r["disk_gbps"] for r in recs),
               "cgroup_peak": max((c["peak"] for c in cgs), default=None),
               "cgroup_failcnt": max((c["failcnt"] for c in cgs), default=None),
               "oom_kills": sum(c["oom_kills"] or 0 for c in cgs) if cgs else None,
               "cached_before_max": max((r["cached_before"] or 0 for r in recs), default=0)}
        if gens:
            row |= {"s_per_token": statistics.median(_s_per_token(g) for g in gens),
                    "s_per_token_all": [_s_per_token(g) for g in gens],
                    "ttft_s": statistics.median(g["ttft_s"] for g in gens),
                    "bytes_per_token": statistics.median(_bytes_per_token(engine, g) for g in gens),
                    "proc_bytes_per_token": statistics.median(g["proc_read_bytes"] / max(g["forward_passes"], 1)
                                                              for g in gens),
                    "majflt_per_token": statistics.median(g["majflt"] / max(g["forward_passes"], 1) for g in gens),
                    "peak_rss": max(r["result"]["peak_rss"] for r in ok),
                    "load_s": statistics.median(r["result"]["load_s"] for r in ok),
                    "info": ok[0]["result"]["info"], "token_ids": gens[0]["token_ids"],
                    "deterministic": all(g["token_ids"] == gens[0]["token_ids"] for g in gens)}
            # the disk measured next to each run, paired with that run's bytes: a swinging disk moves both
            io_s = [_bytes_per_token(engine, g) / (r["disk_gbps"] * 1e9) for r in ok for g in r["result"]["gens"]]
            row["io_s_per_token"] = statistics.median(io_s)
            busy = [g["disk_bytes"] / g["io_busy_s"] / 1e9 for g in gens if g.get("io_busy_s")]
            row["io_busy_gbps"] = statistics.median(busy) if busy else None  # tierlm: bytes / time a read was in flight
        out[(engine, cap)] = row
    return out


def report(a, names, caps, budgets, runs, prepared, cgroup_reason, fmt) -> dict:
    from _common import disk_info, leading_match, machine_info
    rows = summarize(runs)
    ref = rows.get((REFERENCE, None), {}).get("token_ids")
    for (engine, cap), row in rows.items():
        spec = ENGINES[engine]
        if "s_per_token" not in row:
            continue
        if spec.capped:
            floor = rows.get((spec.floor, None), {}).get("s_per_token")
            row["floor_s_per_token"] = floor
            roof = max(row["io_s_per_token"], floor or 0.0)
            if roof > 0:  # nothing streamed and no floor run: no roofline to speak of
                row["roofline_s"], row["of_roofline"] = roof, roof / row["s_per_token"]
            row["achieved_gbps"] = row["bytes_per_token"] / row["s_per_token"] / 1e9
        anchor = rows.get(("llama.cpp", cap) if spec.capped else ("llama.cpp-resident", None), {})
        if spec.kind == "tierlm" and "s_per_token" in anchor:
            row["x_llama"] = row["s_per_token"] / anchor["s_per_token"]
        if ref is not None:
            n = leading_match(row["token_ids"], ref)
            row["greedy_vs_ref"] = "identical" if n == len(ref) == len(row["token_ids"]) else f"{n}/{len(ref)} lead"

    m = machine_info()
    m["disk_model"] = disk_info(a.model)
    m["disk_offload"] = disk_info(a.offload_dir)
    print(f"\nmachine: {m['cpu']} | {m['cores']} cores | RAM {m['ram']} | disk {m['disk_model']}"
          + (f" (offload dir: {m['disk_offload']})" if m["disk_offload"] != m["disk_model"] else "")
          + f" | GPU {m['gpu']} | torch {m['torch']} | load avg {m['loadavg_1m_at_end']:.2f} (1 min, at end)")
    size = os.path.getsize(a.model)
    print(f"model {a.model} ({size / GiB:.2f} GiB); {a.threads} threads; prompt {a.prompt_tokens} ids, "
          f"context {a.context}; per worker 1 warm-up of {a.warmup_tokens} tokens (not counted) + {a.gens} x "
          f"{a.tokens} tokens counted; {a.reps} round(s); medians")
    print("memory cap: " + ("cgroup v1 memory.limit_in_bytes (page cache charged), one fresh cgroup per worker"
                            if not cgroup_reason else f"NONE ({cgroup_reason}): caps in parentheses are not "
                            "enforced; tierlm keeps to --max-memory, llama.cpp to nothing"))
    hdr = (f"{'engine':<21}{'cap':>9}{'budget':>9}{'s/tok':>8}{'x llama':>8}{'GiB/tok':>8}{'/proc':>7}"
           f"{'ach GB/s':>9}{'disk GB/s':>10}{'roofline':>9}{'% roof':>7}  greedy vs {REFERENCE}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    order = [(n, c) for c in caps for n in names if ENGINES[n].capped] + [(n, None) for n in names
                                                                          if not ENGINES[n].capped]

    def f(v, spec="8.3f", dash="-"):
        """v formatted by spec, or `dash` right-aligned to the spec's width when v is missing."""
        if isinstance(v, (int, float)):
            return format(v, spec)
        return dash.rjust(int(spec.split(".")[0].rstrip("df%")))

    for key in order:
        row = rows.get(key)
        if row is None:
            continue
        engine, cap = key
        cap_s = fmt(cap).replace(" ", "") if cap else "none"
        cap_s = f"({cap_s})" if cgroup_reason and cap else cap_s  # (...): not enforced, no cgroup
        budget = (row["budget"] or "none") if ENGINES[engine].kind == "tierlm" else "-"
        if "s_per_token" not in row:
            print(f"{engine:<21}{cap_s:>9}{budget:>9}  {', '.join(row['statuses'])}")
            continue
        print(f"{engine:<21}{cap_s:>9}{budget:>9}{f(row['s_per_token'])}{f(row.get('x_llama'), '8.2f')}"
              f"{f(row['bytes_per_token'] / GiB)}{f(row['proc_bytes_per_token'] / GiB, '7.3f')}"
              f"{f(row.get('achieved_gbps'), '9.2f')}{f(row['disk_gbps'], '10.2f')}"
              f"{f(row.get('roofline_s'), '9.3f')}{f(row.get('of_roofline'), '7.0%')}"
              f"  {row.get('greedy_vs_ref', '-')}{'' if row['deterministic'] else ' (NOT deterministic)'}")
    mh = (f"{'engine':<21}{'cap':>9}{'peak RSS':>11}{'cg peak':>11}{'failcnt':>9}{'oom_kill':>9}{'majflt/tok':>11}"
          f"{'load s':>8}{'ok runs':>8}  notes")
    print("\n" + mh + "\n" + "-" * len(mh))
    for key in order:
        row = rows.get(key)
        if row is None:
            continue
        engine, cap = key
        info = row.get("info", {})
        notes = []
        if "layers_on_disk" in info:
            notes.append(f"{info['layers_on_disk']} layers on disk, ring {info['ring_depth']}, planned "
                         f"{info['planned_s_per_token']:.3f} s/tok"
                         + ("" if info.get("profile_calibrated") else " (uncalibrated profile)"))
        if row.get("io_busy_gbps"):
            notes.append(f"reads ran at {row['io_busy_gbps']:.2f} GB/s while in flight")
        if row.get("floor_s_per_token") is None and ENGINES[engine].capped and "s_per_token" in row:
            notes.append(f"roofline is I/O only ({ENGINES[engine].floor} not run)")
        if row["cached_before_max"]:
            notes.append(f"{fmt(row['cached_before_max'])} still cached at start")
        print(f"{engine:<21}{(fmt(cap).replace(' ', '') if cap else 'none'):>9}"
              f"{(fmt(row['peak_rss']) if 'peak_rss' in row else '-'):>11}"
              f"{(fmt(row['cgroup_peak']) if row['cgroup_peak'] is not None else 'n/a'):>11}"
              f"{f(row['cgroup_failcnt'], '9d', 'n/a'):>9}{f(row['oom_kills'], '9d', 'n/a'):>9}"
              f"{f(row.get('majflt_per_token'), '11.0f'):>11}{f(row.get('load_s'), '8.1f'):>8}"
              f"{row['runs_ok']:>4}/{row['runs']:<3}  {'; '.join(notes)}")
    print("GiB/tok: tierlm = its disk counter (metrics.tiers.disk_bytes / forward_passes); llama.cpp = "
          "/proc/PID/io read_bytes per eval. '/proc' = read_bytes per forward pass for every engine. "
          "roofline = max(GiB/tok / disk GB/s, resident s/token), disk GB/s = the best of O_DIRECT reads of the file the engine "
          "reads before and after its run and (tierlm) its streamer alone; % roof = roofline / s/tok.\n"
          "peak RSS (VmHWM) counts mapped file pages (shared libraries, an mmap'd GGUF) that the cgroup is not charged "
          "for when another process cached them first; cg peak = memory.max_usage_in_bytes (anon + page cache charged).")
    return {"machine": m, "model": a.model, "model_bytes": size, "caps": caps, "budgets": budgets,
            "tokens": a.tokens, "gens_per_worker": a.gens, "warmup_tokens": a.warmup_tokens, "reps": a.reps,
            "threads": a.threads, "prompt_tokens": a.prompt_tokens, "context": a.context,
            "cgroup": None if cgroup_reason else "v1", "cgroup_unavailable_reason": cgroup_reason,
            "rows": [{k: v for k, v in row.items()} for row in rows.values()], "runs": runs, "prepared": prepared}
