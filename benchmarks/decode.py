"""Decode benchmark: tierlm (fp32, int8, int4, int4 with exact kernels) vs llama.cpp and HF transformers fp32
on the embedded SmolLM2-135M-Instruct Q4_1 GGUF, or on any GGUF (--model; e.g. a 7B-shaped Q4_1 file from
`tierlm synth --format gguf`), plus tierlm's batched decode (--batch N: N sequences stepped together against
one) and a per-token breakdown (native layer calls, the head's matmul, the rest: Python, sampling, embedding).

Run from the repository root (anchors: `pip install -e ".[bench]"`; llama-cpp-python compiles for ~6 min on
2 cores, so build its wheel once: `pip wheel --no-deps -w wheels llama-cpp-python`, then install the wheel):

    .venv/bin/python benchmarks/decode.py                       # defaults: 128 new tokens, 1 warm-up, 5 reps
    .venv/bin/python benchmarks/decode.py --threads 2 --reps 9 --json out/decode.json
    .venv/bin/python benchmarks/decode.py --engines tierlm-int4,llama.cpp
    .venv/bin/python benchmarks/decode.py --model /work/models/llama-7b-q4_1.gguf --engines tierlm-int4,llama.cpp \
        --max-tokens 32 --reps 3 --batch 16

tierlm-int4 runs the file's Q4_1 blocks as int4 g=32 without loss (a Q8_0 head as its own int8 g=32 blocks)
on the native integer-dot kernels (int8 activations, as llama.cpp); tierlm-exact the same weights with fp32
activations. llama.cpp runs the same file as it is. Both get the same prompt token ids and thread count.

Method (the team's BENCHMARKS.md): all engines are loaded once into this process, then run
ALTERNATING (tierlm, hf, tierlm, hf, ...). `--warmup` rounds run first and are not counted; `--reps`
rounds are counted, and the median of each is reported. Every engine gets the same prompt token ids
(tokenized once by tierlm's tokenizer), greedy decoding, EOS ignored, and the same torch thread count
(torch.set_num_threads is process-wide and is set once, before any engine loads).

Timing matches tierlm's own metrics (src/tierlm/engine/output.py):
  TTFT   = prefill forward + argmax of the first token;
  decode = each later token's forward + argmax; tok/s = (max_tokens - 1) / decode time.
Detokenization is not timed in either engine.

Ratios are oriented so that > 1 means tierlm is better: tok/s tierlm/anchor, TTFT anchor/tierlm; every
tierlm variant is compared with every anchor. An engine is a class with `name` and
`run(prompt_ids, max_tokens)` returning (ttft_s, decode_tok_s, token_ids), listed in ENGINES.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: silences transformers' GGUF-conversion bar
import torch  # noqa: E402
from _common import leading_match, machine_info  # noqa: E402
from _llama_cpp import greedy  # noqa: E402


class TierlmEngine:
    def __init__(self, threads: int, quant: str = "none", model: str | None = None, kernels: str = "int8"):
        from tierlm import LLM
        self.name = "tierlm-exact" if kernels == "exact" else "tierlm-fp32" if quant == "none" else f"tierlm-{quant}"
        # prefix caching off: every rep prefills the whole prompt, as llama.cpp does after reset()
        self.llm = LLM(model=model, threads=threads, progress=False, quant=quant, enable_prefix_caching=False,
                       kernels=kernels, max_context=2048)

    def run(self, prompt_ids: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
        from tierlm import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        out = self.llm.generate([prompt_ids], params)[0]
        return out.metrics.ttft_s, out.metrics.decode_tok_s, out.token_ids


class HFEngine:
    """transformers fp32 (it dequantises the GGUF on load). A manual greedy loop over the model's KV cache
    rather than `generate()`: it times exactly what tierlm times (forward + argmax per token), with none of
    generate()'s logits processors, stopping criteria or streamer overhead in the measured span."""
    name = "hf-fp32"

    def __init__(self, gguf_path: str):
        from transformers import AutoModelForCausalLM
        d, f = os.path.split(gguf_path)
        self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()

    @torch.inference_mode()
    def run(self, prompt_ids: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        # logits_to_keep=1: only the last position's logits, as tierlm's runner does for prefill.
        out = self.model(torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        tokens, decode_s = [token], 0.0
        for _ in range(max_tokens - 1):
            t0 = time.perf_counter()
            out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            decode_s += time.perf_counter() - t0
            tokens.append(token)
        return ttft, (max_tokens - 1) / decode_s if decode_s > 0 else 0.0, tokens


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python on the same GGUF: eval() the prompt, then one token per eval(),
    greedy by argmax over the last position's logits (what tierlm times: forward + argmax). The logits are
    read from the llama.cpp context itself: with logits_all=False, llama-cpp-python 0.3 no longer copies
    them into `scores`."""
    name = "llama.cpp"

    def __init__(self, gguf_path: str, threads: int):
        from llama_cpp import Llama
        self.llm = Llama(gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)

    def run(self, prompt_ids: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
        ttft, decode_s, tokens = greedy(self.llm, prompt_ids, max_tokens)
        return ttft, (max_tokens - 1) / decode_s if decode_s > 0 else 0.0, tokens


ENGINES = ("tierlm-fp32", "tierlm-int8", "tierlm-int4", "tierlm-exact", "llama.cpp", "hf-fp32")


def make_engines(names: list[str], threads: int, model: str | None) -> list:
    from tierlm.weights.embedded import embedded_model_path
    path = model or str(embedded_model_path())
    make = {"tierlm-fp32": lambda: TierlmEngine(threads, "none", model),
            "tierlm-int8": lambda: TierlmEngine(threads, "int8", model),
            "tierlm-int4": lambda: TierlmEngine(threads, "int4", model),
            "tierlm-exact": lambda: TierlmEngine(threads, "int4", model, "exact"),
            "llama.cpp": lambda: LlamaCppEngine(path, threads), "hf-fp32": lambda: HFEngine(path)}
    return [make[n]() for n in names]


def prompt_ids(prompt: str, model: str | None) -> list[int]:
    from tierlm.weights import open_model
    return open_model(model).tokenizer.encode_chat([{"role": "user", "content": prompt}])


def batched(engine: TierlmEngine, ids: list[int], max_tokens: int, n: int) -> dict:
    """Aggregate decode tok/s of n sequences stepped together (distinct prompts: ids with one token changed)
    and of one alone, each after a warm-up; the ratio is what batching buys."""
    from tierlm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    rates = {}
    for k in (1, n, 1, n):  # warm-up round, then the measured one
        prompts = [ids[:-1] + [ids[-1]] + [100 + j] for j in range(k)]
        t0 = time.perf_counter()
        outs = engine.llm.generate(prompts, params)
        first = max(o.metrics.ttft_s for o in outs)  # decode runs once every prompt is prefilled
        rates[k] = k * (max_tokens - 1) / (time.perf_counter() - t0 - first)
    print(f"\nbatched decode ({engine.name}): 1 sequence {rates[1]:.1f} tok/s, {n} sequences {rates[n]:.1f} tok/s "
          f"in all = {rates[n] / rates[1]:.2f}x one", flush=True)
    return {"one_tok_s": rates[1], f"batch{n}_tok_s": rates[n], "ratio": rates[n] / rates[1]}


def breakdown(engine: TierlmEngine, ids: list[int], max_tokens: int) -> dict:
    """One run with timers around the native layer calls and the head: per decoded token, ms in each and in
    everything else (Python's layer loop, weight acquire/release, embedding, sampling, scheduling)."""
    from tierlm.model import llama
    from tierlm.model import native_layer as ops
    spent = {"layers": 0.0, "head": 0.0}
    real_step, real_head = ops.layer_step, llama.head

    def timed(key, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper
    ops.layer_step, llama.head = timed("layers", real_step), timed("head", real_head)
    try:
        engine.run(ids, 2)  # prefill's share, subtracted below
        prefill = dict(spent)
        spent.update(layers=0.0, head=0.0)
        ttft, rate, _ = engine.run(ids, max_tokens)
    finally:
        ops.layer_step, llama.head = real_step, real_head
    n = max_tokens - 1
    per = {k: (spent[k] - prefill[k]) / n * 1e3 for k in spent}
    per["total"] = 1e3 / rate
    per["rest"] = per["total"] - per["layers"] - per["head"]
    print(f"per decoded token ({engine.name}): {per['total']:.2f} ms = native layers {per['layers']:.2f} + head "
          f"{per['head']:.2f} + rest (Python, sampling, embedding) {per['rest']:.2f}", flush=True)
    return per


def run_alternating(engines: list, ids: list[int], max_tokens: int, warmup: int, reps: int) -> dict:
    """Rounds of one run per engine, in order; the first `warmup` rounds are dropped."""
    runs: dict[str, list] = {e.name: [] for e in engines}
    for r in range(warmup + reps):
        for e in engines:
            ttft, tok_s, toks = e.run(ids, max_tokens)
            tag = "warm-up" if r < warmup else f"rep {r - warmup + 1}/{reps}"
            print(f"  {tag:>9} {e.name:<12} ttft {ttft * 1e3:7.1f} ms  decode {tok_s:6.1f} tok/s", flush=True)
            if r >= warmup:
                runs[e.name].append((ttft, tok_s, toks))
    return runs


def summarize(runs: dict) -> dict:
    out = {}
    for name, rs in runs.items():
        ttfts, rates = [r[0] for r in rs], [r[1] for r in rs]
        out[name] = {"ttft_ms_median": statistics.median(ttfts) * 1e3,
                     "decode_tok_s_median": statistics.median(rates),
                     "ttft_ms_all": [t * 1e3 for t in ttfts], "decode_tok_s_all": rates,
                     "deterministic": all(r[2] == rs[0][2] for r in rs), "token_ids": rs[0][2]}
    return out


def report(summary: dict, machine: dict, n_prompt: int, args: argparse.Namespace) -> dict:
    print(f"\nmachine: {machine['cpu']} | {machine['cores']} cores | {machine['torch_threads']} torch threads | "
          f"RAM {machine['ram']} | GPU {machine['gpu']} | torch {machine['torch']} | python {machine['python']}"
          f" | load avg {machine['loadavg_1m_at_end']:.2f} (1 min, at end)")
    print(f"prompt {n_prompt} tokens, {args.max_tokens} new tokens (greedy, EOS ignored), "
          f"{args.warmup} warm-up round(s) dropped, {args.reps} counted per engine")
    print(f"\n{'engine':<14}{'TTFT ms (median)':>18}{'decode tok/s (median)':>24}")
    for name, s in summary.items():
        print(f"{name:<14}{s['ttft_ms_median']:>18.1f}{s['decode_tok_s_median']:>24.1f}")
    ratios, matches = {}, {}
    ours = [n for n in summary if n.startswith("tierlm")]
    print(f"\n{'tierlm':<14}{'vs':<10}{'decode x':>10}{'TTFT x':>9}  leading greedy tokens equal  (>1 = tierlm better)")
    for mine in ours:
        base = summary[mine]
        for name, ref in summary.items():  # every tierlm variant against every anchor
            if name.startswith("tierlm"):
                continue
            key = f"{mine}/{name}"
            ratios[key] = {"decode_tok_s_tierlm_over": base["decode_tok_s_median"] / ref["decode_tok_s_median"],
                           "ttft_over_tierlm": ref["ttft_ms_median"] / base["ttft_ms_median"]}
            matches[key] = leading_match(base["token_ids"], ref["token_ids"])
            print(f"{mine:<14}{name:<10}{ratios[key]['decode_tok_s_tierlm_over']:>9.2f}x"
                  f"{ratios[key]['ttft_over_tierlm']:>8.2f}x  {matches[key]}/{args.max_tokens}")
    print("deterministic across reps: " + ", ".join(f"{n}={s['deterministic']}" for n, s in summary.items()))
    return {"machine": machine, "prompt_tokens": n_prompt, "max_tokens": args.max_tokens, "warmup": args.warmup,
            "reps": args.reps, "engines": summary, "ratios": ratios, "leading_tokens_match": matches,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for all engines")
    ap.add_argument("--max-tokens", type=int, default=128, help="new tokens per run (EOS ignored)")
    ap.add_argument("--reps", type=int, default=5, help="counted rounds")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds run first")
    ap.add_argument("--prompt", default="What is the capital of France?", help="user message (chat-formatted)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list from {', '.join(ENGINES)}")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--batch", type=int, default=16, help="sequences in the batched-decode measurement (0: skip)")
    args = ap.parse_args()
    if args.threads < 1 or args.max_tokens < 2 or args.reps < 1 or args.warmup < 0:
        ap.error("need --threads >= 1, --max-tokens >= 2, --reps >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)  # process-wide: one setting for every engine
    names = args.engines.split(",")
    if not set(names) <= set(ENGINES):
        ap.error(f"unknown engine in {args.engines!r} (choose from {', '.join(ENGINES)})")
    engines = make_engines(names, args.threads, args.model)
    ids = prompt_ids(args.prompt, args.model)
    runs = run_alternating(engines, ids, args.max_tokens, args.warmup, args.reps)
    result = report(summarize(runs), machine_info(), len(ids), args)
    result["model"] = args.model or "embedded"
    first = next((e for e in engines if isinstance(e, TierlmEngine)), None)
    if first is not None:
        result["breakdown_ms"] = breakdown(first, ids, args.max_tokens)
        if args.batch > 1:
            result["batched"] = batched(first, ids, args.max_tokens, args.batch)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
