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
# The newest triton release, tested beside the pinned one (README, "Compatibility"): installed without
# dependencies into a folder of its own (torch's pin keeps triton 3.6 in .venv) and put first on
# PYTHONPATH for a second run of the kernel tests and the AOT compile check. Its wheels need Python >= 3.11.
TRITON_NEWEST ?= 3.9.0
TRITON_NEWEST_DIR ?= .venv-triton-newest
NEWEST_TESTS ?= tests/test_forward.py tests/test_backward.py tests/test_packed.py tests/test_weights.py \
	tests/test_normalize.py tests/test_attention_pool.py tests/test_global_pool.py tests/test_partial.py \
	tests/test_edge_cases.py tests/test_fast_launch.py tests/test_triton_version.py tests/test_aot_compile.py
NEWEST_SELECT ?= --pairwise

.PHONY: test test-pinned test-newest bench bench-gpu aot clean

$(VENV)/.installed: pyproject.toml setup.cfg Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)" "$(NUMPY_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench]" "$(TORCH_SPEC)" "$(TRITON_SPEC)" "$(NUMPY_SPEC)"
	touch $@

$(TRITON_NEWEST_DIR)/.installed: Makefile | $(VENV)/.installed
	rm -rf $(TRITON_NEWEST_DIR)
	$(PY) -m pip install --quiet --no-deps --target $(TRITON_NEWEST_DIR) "triton==$(TRITON_NEWEST)"
	touch $@

# The whole suite on the pinned triton, then the kernel tests and the AOT check on the newest one.
test: $(TRITON_NEWEST_DIR)/.installed test-pinned test-newest

test-pinned: $(VENV)/.installed
	$(PY) -P -m pytest -n $(JOBS)

test-newest: $(VENV)/.installed $(TRITON_NEWEST_DIR)/.installed
	PYTHONPATH="$(abspath $(TRITON_NEWEST_DIR))" $(PY) -P -c \
		"import triton; assert triton.__version__ == '$(TRITON_NEWEST)', triton.__file__; print('triton', triton.__version__)"
	PYTHONPATH="$(abspath $(TRITON_NEWEST_DIR))" $(PY) -P -m pytest -n $(JOBS) $(NEWEST_SELECT) $(NEWEST_TESTS)

bench: $(VENV)/.installed
	FASTPOOL_BACKEND=auto $(PY) bench/run.py

bench-gpu: $(VENV)/.installed
	$(PY) bench/run.py --preset gpu

aot: $(VENV)/.installed
	$(PY) -m fastpool.aot --arch 80 90

clean:
	rm -rf $(VENV) $(TRITON_NEWEST_DIR) .pytest_cache .hypothesis
