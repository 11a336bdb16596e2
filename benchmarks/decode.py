"""Decode benchmark: tierlm vs HF transformers fp32 on the embedded SmolLM2-135M-Instruct Q4_1 GGUF.

Run from the repository root (transformers must be installed: `pip install -e ".[bench]"`):

    .venv/bin/python benchmarks/decode.py                       # defaults: 128 new tokens, 1 warm-up, 5 reps
    .venv/bin/python benchmarks/decode.py --threads 2 --reps 9 --json out/decode.json

Method (the team's BENCHMARKS.md): all engines are loaded once into this process, then run
ALTERNATING (tierlm, hf, tierlm, hf, ...). `--warmup` rounds run first and are not counted; `--reps`
rounds are counted, and the median of each is reported. Every engine gets the same prompt token ids
(tokenized once by tierlm's tokenizer), greedy decoding, EOS ignored, and the same torch thread count
(torch.set_num_threads is process-wide and is set once, before any engine loads).

Timing matches tierlm's own metrics (src/tierlm/engine/generation.py):
  TTFT   = prefill forward + argmax of the first token;
  decode = each later token's forward + argmax; tok/s = (max_tokens - 1) / decode time.
Detokenization is not timed in either engine.

Ratios are oriented so that > 1 means tierlm is better: tok/s tierlm/hf, TTFT hf/tierlm.
To add an engine (e.g. llama.cpp), write a class with `name` and `run(prompt_ids, max_tokens)` returning
(ttft_s, decode_tok_s, token_ids) and append it in `make_engines`.
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
from _common import machine_info  # noqa: E402


class TierlmEngine:
    def __init__(self, threads: int, dtype: str = "float32"):
        from tierlm import LLM
        self.name = "tierlm" if dtype == "float32" else "tierlm-bf16"
        self.llm = LLM(model=None, dtype=dtype, threads=threads, progress=False)

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


def make_engines(threads: int, bf16: bool = False) -> list:
    from tierlm.weights.embedded import embedded_model_path
    extra = [TierlmEngine(threads, "bfloat16")] if bf16 else []
    return [TierlmEngine(threads), HFEngine(str(embedded_model_path())), *extra]


def prompt_ids(engine: TierlmEngine, prompt: str) -> list[int]:
    return engine.llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])


def run_alternating(engines: list, ids: list[int], max_tokens: int, warmup: int, reps: int) -> dict:
    """Rounds of one run per engine, in order; the first `warmup` rounds are dropped."""
    runs: dict[str, list] = {e.name: [] for e in engines}
    for r in range(warmup + reps):
        for e in engines:
            ttft, tok_s, toks = e.run(ids, max_tokens)
            tag = "warm-up" if r < warmup else f"rep {r - warmup + 1}/{reps}"
            print(f"  {tag:>9} {e.name:<8} ttft {ttft * 1e3:7.1f} ms  decode {tok_s:6.1f} tok/s", flush=True)
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


def leading_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def report(summary: dict, machine: dict, n_prompt: int, args: argparse.Namespace) -> dict:
    print(f"\nmachine: {machine['cpu']} | {machine['cores']} cores | {machine['torch_threads']} torch threads | "
          f"RAM {machine['ram']} | GPU {machine['gpu']} | torch {machine['torch']} | python {machine['python']}"
          f" | load avg {machine['loadavg_1m_at_end']:.2f} (1 min, at end)")
    print(f"prompt {n_prompt} tokens, {args.max_tokens} new tokens (greedy, EOS ignored), "
          f"{args.warmup} warm-up round(s) dropped, {args.reps} counted per engine")
    print(f"\n{'engine':<10}{'TTFT ms (median)':>18}{'decode tok/s (median)':>24}")
    for name, s in summary.items():
        print(f"{name:<10}{s['ttft_ms_median']:>18.1f}{s['decode_tok_s_median']:>24.1f}")
    base, ratios, matches = summary["tierlm"], {}, {}
    for name, ref in summary.items():  # every other engine against tierlm
        if name == "tierlm":
            continue
        ratios[name] = {"decode_tok_s_tierlm_over": base["decode_tok_s_median"] / ref["decode_tok_s_median"],
                        "ttft_over_tierlm": ref["ttft_ms_median"] / base["ttft_ms_median"]}
        matches[name] = leading_match(base["token_ids"], ref["token_ids"])
        same = sum(x == y for x, y in zip(base["token_ids"], ref["token_ids"]))
        print(f"\nvs {name}: decode tok/s tierlm/{name} {ratios[name]['decode_tok_s_tierlm_over']:.2f}x, "
              f"TTFT {name}/tierlm {ratios[name]['ttft_over_tierlm']:.2f}x  (>1 = tierlm better)")
        print(f"  greedy tokens: {matches[name]}/{args.max_tokens} leading tokens match "
              f"({same} equal position-wise)")
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
    ap.add_argument("--bf16", action="store_true", help="also run tierlm with bf16 compute")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()
    if args.threads < 1 or args.max_tokens < 2 or args.reps < 1 or args.warmup < 0:
        ap.error("need --threads >= 1, --max-tokens >= 2, --reps >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)  # process-wide: one setting for every engine
    engines = make_engines(args.threads, args.bf16)
    ids = prompt_ids(engines[0], args.prompt)
    runs = run_alternating(engines, ids, args.max_tokens, args.warmup, args.reps)
    result = report(summarize(runs), machine_info(), len(ids), args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
