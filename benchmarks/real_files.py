"""Real GGUF files, tierlm (its defaults) against llama.cpp's own tools on the same file and threads (issue 24).

For each file (the embedded SmolLM2 and the files tests/fetch_real.py fetches), alternating tierlm and
llama.cpp, `--runs` times each, medians:
  load      a fresh process to its first token of a short prompt (wall clock: imports, open, first step)
  prefill   512 tokens (tierlm bench / llama-bench -p 512), seconds
  decode    64 tokens after a 512-token prompt (tierlm bench / llama-bench -n 64 -d 512), tok/s
  peak RSS  of the prefill+decode process (/usr/bin/time -v), MiB
  ppl       tierlm eval-ppl --scheme llama.cpp --window 512 vs llama-perplexity -c 512 on --text
and every ratio is tierlm ÷ llama.cpp of the figure as printed (decode tok/s ≥ 1.0 and the others ≤ 1.0 are
wins).

Build llama.cpp's tools as BENCHMARKS.md says and pass their folder:
  python benchmarks/real_files.py --llama-bin /path/to/llama.cpp/build/bin [--runs 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _cgroup import evict  # noqa: E402
from fetch_real import FILES  # noqa: E402

TEXT = ROOT / "tests" / "data" / "english.txt"
PROMPT = "The capital of France is"


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout+stderr) of one command under /usr/bin/time -v."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) * 1024
    return wall, rss, out.stdout + out.stderr


def _drop_cache(path: str) -> None:
    """The file out of the page cache: a load is timed from disk for both engines alike."""
    evict([Path(path)])


class Tierlm:
    name = "tierlm"

    def __init__(self, threads: int):
        self.bin = [str(ROOT / ".venv" / "bin" / "tierlm")]
        self.threads = threads

    def load(self, model: str) -> float:
        _drop_cache(model)
        return _timed([*self.bin, "generate", "--model", model, "--prompt", PROMPT, "--max-tokens", "1",
                       "--temperature", "0", "--no-stream", "--threads", str(self.threads)])[0]

    def speed(self, model: str) -> tuple[float, float, int]:
        _, rss, out = _timed([*self.bin, "bench", "--model", model, "--prompt-tokens", "512", "--tokens", "64",
                              "--threads", str(self.threads), "--max-context", "640"])
        m = re.search(r"prefill 512 tokens: (\d+) ms; decode 64 tokens .*?\(([\d.]+) tok/s\)", out)
        return int(m.group(1)) / 1e3, float(m.group(2)), rss

    def ppl(self, model: str) -> float:
        out = _timed([*self.bin, "eval-ppl", "--model", model, "--text", str(TEXT), "--scheme", "llama.cpp",
                      "--window", "512", "--threads", str(self.threads)])[2]
        return float(re.search(r"^auto \(.*?\)\s+([\d.]+)", out, re.M).group(1))


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, bin_dir: Path, threads: int):
        self.bin, self.threads = bin_dir, str(threads)

    def load(self, model: str) -> float:
        _drop_cache(model)
        return _timed([str(self.bin / "llama-completion"), "-m", model, "-p", PROMPT, "-n", "1", "-t", self.threads,
                       "--temp", "0", "-no-cnv", "-c", "640"])[0]

    def speed(self, model: str) -> tuple[float, float, int]:
        # decode at the depth tierlm's bench decodes at (after its 512-token prompt): llama-bench's tg64 alone
        # starts from an empty cache, 1.5x faster than at depth 512 for the embedded model
        _, rss, out = _timed([str(self.bin / "llama-bench"), "-m", model, "-t", self.threads, "-p", "512",
                              "-n", "64", "-d", "0,512", "-r", "1", "-o", "json"])
        rows = json.loads(out[out.index("["):out.rindex("]") + 1])
        pp = next(r for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0 and r.get("n_depth", 0) == 0)
        tg = next(r for r in rows if r["n_gen"] == 64 and r["n_prompt"] == 0 and r.get("n_depth", 0) == 512)
        return 512 / pp["avg_ts"], tg["avg_ts"], rss

    def ppl(self, model: str) -> float:
        out = _timed([str(self.bin / "llama-perplexity"), "-m", model, "-f", str(TEXT), "-c", "512", "-b", "512",
                      "-t", self.threads])[2]
        return float(re.search(r"Final estimate: PPL = ([\d.]+)", out).group(1))


def measure(engines: list, model: str, runs: int) -> dict[str, dict[str, float]]:
    """Alternating engines, `runs` times each; medians per figure (perplexity is deterministic: once)."""
    got: dict[str, dict[str, list[float]]] = {e.name: {} for e in engines}
    for run in range(runs):
        for e in engines if run % 2 == 0 else engines[::-1]:
            figures = got[e.name]
            figures.setdefault("load_s", []).append(e.load(model))
            prefill, decode, rss = e.speed(model)
            figures.setdefault("prefill_s", []).append(prefill)
            figures.setdefault("decode_tok_s", []).append(decode)
            figures.setdefault("rss_mib", []).append(rss / 2**20)
            print(f"  {e.name:9} run {run + 1}: load {figures['load_s'][-1]:.2f} s, prefill {prefill:.2f} s, "
                  f"decode {decode:.1f} tok/s, peak RSS {rss / 2**20:.0f} MiB", flush=True)
    for e in engines:
        got[e.name]["ppl"] = [e.ppl(model)]
    return {name: {k: statistics.median(v) for k, v in figs.items()} for name, figs in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", type=Path, required=True, help="llama.cpp's build/bin folder")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--files", nargs="*", help="GGUF files (default: the embedded model and tests/fetch_real.py's)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from _common import machine_info  # torch: imported after the argument check only

    from tierlm.weights.embedded import embedded_model_path

    files = args.files or [str(embedded_model_path())] + [str(f.path) for f in FILES if f.path.exists()]
    engines = [Tierlm(args.threads), LlamaCpp(args.llama_bin, args.threads)]
    print(json.dumps(machine_info()))
    rows = []
    for model in files:
        print(f"{Path(model).name}:", flush=True)
        r = measure(engines, model, args.runs)
        t, c = r["tierlm"], r["llama.cpp"]
        rows.append((Path(model).name, t, c))
    print(f"\n{'file':<38} {'load s':>14} {'prefill 512 s':>16} {'decode tok/s':>16} {'peak RSS MiB':>16} "
          f"{'ppl (c=512)':>18}")
    for name, t, c in rows:
        cells = [f"{t[k]:.2f}/{c[k]:.2f} {t[k] / c[k]:.2f}x" if k != "rss_mib" else
                 f"{t[k]:.0f}/{c[k]:.0f} {t[k] / c[k]:.2f}x" for k in ("load_s", "prefill_s", "decode_tok_s",
                                                                         "rss_mib")]
        cells.append(f"{t['ppl']:.3f}/{c['ppl']:.3f} {t['ppl'] / c['ppl']:.3f}x")
        print(f"{name:<38} {cells[0]:>14} {cells[1]:>16} {cells[2]:>16} {cells[3]:>16} {cells[4]:>18}")
    print("cells: tierlm/llama.cpp ratio; targets: load ≤ 2x, prefill ≤ 1.0x (time), decode ≥ 1.0x, "
          "RSS ≤ 1.15x, ppl ≤ 1.01x")


if __name__ == "__main__":
    main()
