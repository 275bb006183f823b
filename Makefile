# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qatforge-installed
CORES ?= all
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-unsloth verify bench lint rulegraph clean

install: $(STAMP)

# Idempotent: reinstalls only when the pins, the package metadata or the installer change.
$(STAMP): pyproject.toml constraints.txt src/qatforge/capabilities/install.py tools/install_llama_cpp.sh tools/install_go_template.sh tools/ollama_template/main.go
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	tools/install_llama_cpp.sh $(VENV) constraints.txt
	tools/install_go_template.sh $(VENV)
	$(BIN)/python -m qatforge.capabilities write
	touch $@

run: install
	$(BIN)/snakemake --cores $(CORES)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The Unsloth backend on CPU (not part of CI): installs unsloth without its deps (keeps torch).
test-unsloth: install
	$(BIN)/pip install -q --no-deps -c constraints.txt unsloth unsloth_zoo
	QATFORGE_TEST_UNSLOTH=1 $(BIN)/python -m pytest tests/test_train.py -k unsloth

verify: install
	$(BIN)/python -m qatforge.verify results

bench: install
	$(BIN)/python bench/perf.py --out results/perf

lint: install
	$(BIN)/snakemake --lint

rulegraph: install
	$(BIN)/snakemake --rulegraph > docs/rulegraph.dot

clean:
	rm -rf results/* logs benchmarks .snakemake
	git checkout -- results/.gitignore
