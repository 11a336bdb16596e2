"""Perplexity bounds of tierlm's numerics on the embedded model (real weights, real English), one table:

    .venv/bin/python benchmarks/quality.py [--tokens 1024] [--json out/quality.json]

Rows, each a fresh LLM scoring the same token ids (tests/data/english.txt, window 512, stride 256; every window
one scoring request through the engine, as `tierlm eval-ppl` runs it), with the bound the suite held before
these became figures (the suite keeps the int4 row as its smoke test: tests/test_eval_ppl.py):
  fp32            the GGUF's own dequantised weights: the reference
  int4 g=32       its Q4_1 blocks without loss (bf16 activations, int8 head)      <= +1.5%
  int8 g=128      requantised from the 4-bit grid, dequantising kernel            <= +1%
  int8 channel    requantised, one scale per 576-wide row                         <= +2%
  and, with the integer-dot kernels (TIERLM_NATIVE=1), on the first 512 tokens (one window):
  int-dot exact   W4A32: fp32 activations into the int-dot kernels: the reference
  int-dot int8    8-bit activations, as llama.cpp                                 <= +2%  (and > exact)
Exit status 1 when a bound fails. Measured before the move (2-core EPYC): int4 +1.27%, int8 per channel +1.7%
on 1024 tokens; int-dot int8 +1.06% on 512.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import machine_info

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "english.txt"


def ppl(quant, ids: list[int], window: int = 512, stride: int = 256, **kw) -> float:
    from tierlm import LLM
    from tierlm.eval_ppl import perplexity
    with LLM(None, quant=quant, progress=False, max_context=window, **kw) as llm:
        return perplexity(llm, ids, window, stride, str(quant), progress=False).ppl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from tierlm.quant import QuantScheme
    from tierlm.weights import open_model
    from tierlm.weights.embedded import embedded_model_path
    ids = open_model(str(embedded_model_path())).tokenizer.encode(TEXT.read_text())
    rows, ok = [], True

    def row(name: str, value: float, ref: float | None, bound: float | None, extra: bool = True) -> None:
        nonlocal ok
        passed = bound is None or (value <= ref * (1 + bound) and extra)
        ok &= passed
        delta = f"{100 * (value / ref - 1):+.2f}%" if ref else ""
        want = f"<= +{100 * bound:.1f}%" if bound is not None else "reference"
        print(f"{name:14s} {value:8.3f} {delta:>8s}  {want:10s} {'ok' if passed else 'FAILED'}", flush=True)
        rows.append({"row": name, "ppl": value, "ratio": value / ref if ref else 1.0, "bound": bound, "ok": passed})

    t0 = time.perf_counter()
    text = ids[:a.tokens]
    ref = ppl("none", text)
    row("fp32", ref, None, None)
    row("int4 g=32", ppl("int4", text), ref, 0.015)
    row("int8 g=128", ppl(QuantScheme("int8", 128), text), ref, 0.01)
    row("int8 channel", ppl("int8", text), ref, 0.02)
    from tierlm import native
    if native.lib() is not None:
        os.environ["TIERLM_NATIVE"] = "1"  # read at the first load of this process's native library state
        native._load.cache_clear()
        from tierlm.quant import int4
        int4.layout.cache_clear()
        exact = ppl("auto", ids[:512], kernels="exact")
        row("int-dot exact", exact, None, None)
        int8 = ppl("auto", ids[:512], kernels="int8")
        row("int-dot int8", int8, exact, 0.02, int8 > exact)
    else:
        print(f"int-dot rows skipped: native kernels {native.status()}")
    info = machine_info()
    print(f"{time.perf_counter() - t0:.0f} s; machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": info, "tokens": a.tokens, "rows": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
