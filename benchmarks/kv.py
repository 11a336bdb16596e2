"""KV cache benchmark: prefix-cache TTFT, slot waste, sequences per KV budget, batched decode throughput.

Run from the repository root:

    .venv/bin/python benchmarks/kv.py                        # embedded SmolLM2-135M, fp32, 3 reps
    .venv/bin/python benchmarks/kv.py --quant int8 --reps 5 --json out/kv.json
    .venv/bin/python benchmarks/kv.py --model /work/models/tinyllama-fp32 --sections a,c

Sections (each prints its own table; > 1 ratios are better for the variant named first):
  a  TTFT of a request whose 2,000-token prefix was seen before: cold (prefix caching off, the whole prompt
     prefilled) vs device hit (the blocks are in the pool) vs host hit and disk hit (another long prompt
     pushed them out of a pool that holds one, into the host tier / checksummed block files, evicted from
     the page cache); ALTERNATING engines each rep, medians. Targets: device hit <= 0.1x cold, disk hit
     >= 10x faster than cold (restore vs recompute).
  b  slot waste of the paged pool (allocated-but-unused token slots / allocated), averaged over the decode
     steps of 16 sequences of 100-600 tokens. Target < 2%.
  c  most sequences decoded together under one fixed KV budget (--kv-memory, default 64MiB), prompts of
     100 tokens + 28 new, pool stored as float32 / bfloat16 / int8. Target int8 >= 1.9x bfloat16.
  d  aggregate output tok/s (wall time, prefill included) of 16 sequences on the engine loop vs one alone, 64 new tokens each,
     ALTERNATING single/batch, medians. Target >= 6x.
  e  KV format quality (float32, bfloat16, int8): perplexity delta on the shipped text, and leading greedy
     tokens equal to the float32-KV run on 5 chat questions.

Prompts are windows of tests/data/english.txt (public domain), tokenized once; greedy, EOS ignored.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import machine_info

from tierlm import LLM, SamplingParams
from tierlm.engine.scheduler import SchedulerCounters

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "english.txt"


def corpus(llm: LLM, n: int) -> list[int]:
    ids = llm.tokenizer.encode(TEXT.read_text())
    return (ids * (n // len(ids) + 1))[:n]


def windows(ids: list[int], count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (count,), generator=g).tolist()
    return [ids[s:s + length] for s in starts]


def run_batch(llm: LLM, prompts: list[list[int]], max_tokens: int):
    """Every prompt together on the engine loop; (the scheduler's counters for this batch alone, outputs)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.engine.scheduler.counters = SchedulerCounters()
    outs = llm.generate(prompts, params)
    return llm.engine.scheduler.counters, outs


def section_a(args, common: dict) -> dict:
    """Each rep: a new 8-token question after the shared prefix, asked of four engines whose caches hold the
    prefix in a different place: nowhere (cold), the pool, the host tier, the disk tier."""
    import tempfile

    from tierlm.kvcache.pool import block_nbytes
    probe = LLM(args.model, **common)
    ids = corpus(probe, args.prefix * 2 + 400)
    prefix, other = ids[:args.prefix], ids[args.prefix + 300:2 * args.prefix + 300]  # `other` evicts `prefix`
    per_block = block_nbytes(probe.config, probe.kv.block_size, probe.kv.pool.storage)
    small = -(-(args.prefix + 100) // probe.kv.block_size) * per_block  # the pool holds one long prompt
    probe.close()
    tmp = Path(tempfile.mkdtemp(prefix="tierlm-kvbench-"))
    engines = {
        "cold": LLM(args.model, **common, enable_prefix_caching=False),
        "device hit": LLM(args.model, **common),
        "host hit": LLM(args.model, **common, kv_memory=small, kv_host_memory=small * 2),
        "disk hit": LLM(args.model, **common, kv_memory=small, kv_offload_dir=tmp / "kv"),
    }
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times: dict[str, list[float]] = {k: [] for k in engines}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.reps + 1):
        question = ids[args.prefix + 8 * rep:args.prefix + 8 * rep + 8]
        for name, llm in engines.items():
            if name != "cold":
                llm.generate([prefix + ids[args.prefix + 200:args.prefix + 208]], one)  # the prefix is cached
                if name in ("host hit", "disk hit"):
                    llm.generate([other], one)  # ... and pushed out of the pool by another long prompt
            out = llm.generate([prefix + question], one)[0]
            tokens.setdefault(name, []).append(out.token_ids[0])
            if rep:  # the first round warms up
                times[name].append(out.metrics.ttft_s)
    res = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"\n(a) TTFT, {args.prefix}-token shared prefix + 8 new tokens (median of {args.reps}; a new question each rep)")
    for name, ms in res.items():
        print(f"  {name:11s} {ms:9.1f} ms   {ms / res['cold']:.3f}x cold")
    for name in ("host hit", "disk hit"):
        t = engines[name].kv.tiers.counters
        print(f"  {name}: {t.host_restores} host / {t.disk_restores} disk block restores, {t.corrupt} corrupt")
    same = all(tokens[k] == tokens["cold"] for k in tokens)
    print(f"  targets: device hit <= 0.1x cold: {res['device hit'] / res['cold']:.3f}x; disk restore >= 10x faster "
          f"than recompute: {res['cold'] / res['disk hit']:.1f}x; first tokens equal across engines: {same}")
    res["first_tokens_equal"] = same
    for llm in engines.values():
        llm.close()
    return res


def section_b(args, common: dict) -> dict:
    llm = LLM(args.model, **common)
    ids = corpus(llm, 4000)
    g = torch.Generator().manual_seed(1)
    prompts = [w for n in torch.randint(100, 600, (16,), generator=g).tolist() for w in windows(ids, 1, n, seed=n)]
    counters, _ = run_batch(llm, prompts, max_tokens=32)
    res = {"mean_waste": counters.mean_waste, "sequences": 16, "block_size": llm.kv.block_size}
    print(f"\n(b) slot waste, 16 sequences of 100-600 tokens + 32 new, block {llm.kv.block_size}: "
          f"{100 * counters.mean_waste:.2f}% (mean over {counters.steps} decode steps; target < 2%)")
    return res


def section_c(args, common: dict) -> dict:
    res = {}
    print(f"\n(c) sequences decoded together under kv_memory={args.kv_memory} (100-token prompts + 28 new)")
    for store in ("float32", "bfloat16", "int8"):
        llm = LLM(args.model, **common, kv_memory=args.kv_memory, kv_dtype=store)
        ids = corpus(llm, 4000)
        blocks = llm.kv.manager.num_blocks
        per_seq = -(-128 // llm.kv.block_size)
        prompts = windows(ids, blocks // per_seq + 8, 100, seed=2)  # more than fit: the pool is the limit
        counters, _ = run_batch(llm, prompts, max_tokens=28)
        res[store] = {"blocks": blocks, "max_running": counters.max_running, "preemptions": counters.preemptions}
        print(f"  {store:9s} {blocks:6d} blocks   {counters.max_running:4d} sequences together   "
              f"{counters.preemptions} preemptions")
        llm.close()
    res["int8_over_bf16"] = res["int8"]["max_running"] / res["bfloat16"]["max_running"]
    print(f"  int8 / bfloat16: {res['int8_over_bf16']:.2f}x (target >= 1.9x)")
    return res


def section_d(args, common: dict) -> dict:
    llm = LLM(args.model, **common)
    ids = corpus(llm, 4000)
    prompts = windows(ids, 16, 64, seed=3)
    single, batch = [], []
    for rep in range(args.reps + 1):
        t = time.perf_counter()
        _, one = run_batch(llm, prompts[:1], max_tokens=64)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        _, outs = run_batch(llm, prompts, max_tokens=64)
        t16 = time.perf_counter() - t
        if rep:  # output tokens per second of wall time, prefill included (the engine mixes both in its steps)
            single.append(len(one[0].token_ids) / t1)
            batch.append(sum(len(o.token_ids) for o in outs) / t16)
    res = {"single_tok_s": statistics.median(single), "batch16_tok_s": statistics.median(batch)}
    res["ratio"] = res["batch16_tok_s"] / res["single_tok_s"]
    print(f"\n(d) aggregate output tokens/s, 64-token prompts + 64 new tokens each, prefill included "
          f"(median of {args.reps})")
    print(f"  1 sequence    {res['single_tok_s']:8.1f} tok/s")
    print(f"  16 sequences  {res['batch16_tok_s']:8.1f} tok/s   {res['ratio']:.2f}x (target >= 6x)")
    return res


QUESTIONS = ["What is the capital of France? Answer in one sentence.", "Write a short poem about the sea.",
             "Explain what a KV cache is.", "List three fruits.", "Who wrote Hamlet?"]


def section_e(args, common: dict) -> dict:
    """Perplexity of each KV format, and how many leading greedy tokens (of 128) match the fp32-KV run on
    five chat questions (a chaotic measure: one near-tie flips everything after it)."""
    from tierlm.eval_ppl import perplexity
    print("\n(e) KV format quality: perplexity on tests/data/english.txt (window 512, stride 256); leading greedy "
          "tokens equal to the float32-KV run, 5 chat questions x 128 tokens")
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    res, ref_tokens = {}, None
    for store in ("float32", "bfloat16", "int8"):
        llm = LLM(args.model, **common, kv_dtype=store, enable_prefix_caching=False)
        ppl = perplexity(llm, llm.tokenizer.encode(TEXT.read_text()), 512, 256, store, progress=False).ppl
        tokens = [llm.generate([llm.tokenizer.encode_chat([{"role": "user", "content": q}])], params)[0].token_ids
                  for q in QUESTIONS]
        ref_tokens = ref_tokens or tokens
        leading = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), 128) for x, y in zip(ref_tokens, tokens)]
        res[store] = {"ppl": ppl, "leading_equal": leading, "block_bytes": llm.kv.pool.block_bytes}
        base = res["float32"]["ppl"]
        print(f"  {store:9s} ppl {ppl:8.3f} ({100 * (ppl / base - 1):+.2f}%)   leading tokens equal {leading}   "
              f"{llm.kv.pool.block_bytes / 1024:.0f} KiB per block")
        llm.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: embedded SmolLM2-135M)")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefix", type=int, default=2000, help="shared prefix tokens for (a)")
    ap.add_argument("--kv-memory", default="64MiB", help="KV budget for (c)")
    ap.add_argument("--sections", default="a,b,c,d,e")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(progress=False, quant=args.quant, max_context=4096)
    t0 = time.perf_counter()
    results = {"machine": machine_info(), "model": args.model or "embedded SmolLM2-135M-Instruct Q4_1",
               "quant": args.quant}
    for name in args.sections.split(","):
        results[name] = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e}[name](args, common)
    m = results["machine"]
    print(f"\nmachine: {m['cpu']} | {m['cores']} cores | {args.threads} threads | torch {m['torch']} | "
          f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
