# Two entry points (see README): `make bench` runs the benchmark, `make test` the test suite.
# Each creates .venv and installs what it needs on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned for reproducible runs: the CPU CI image ships this torch; triton 3.6 is what the GPU
# image has; the Triton 3.6 interpreter needs numpy < 2.4.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
NUMPY_SPEC ?= numpy<2.4
JOBS ?= 2

.PHONY: test bench bench-gpu aot clean

$(VENV)/.installed: pyproject.toml setup.cfg Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)" "$(NUMPY_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench]" "$(TORCH_SPEC)" "$(TRITON_SPEC)" "$(NUMPY_SPEC)"
	touch $@

test: $(VENV)/.installed
	$(PY) -P -m pytest -n $(JOBS)

bench: $(VENV)/.installed
	FASTPOOL_BACKEND=auto $(PY) bench/run.py

bench-gpu: $(VENV)/.installed
	$(PY) bench/run.py --preset gpu

aot: $(VENV)/.installed
	$(PY) -m fastpool.aot --arch 80 90

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
