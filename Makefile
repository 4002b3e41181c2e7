# make demo / make test work on a fresh clone: they create .venv from Python 3.10 and install into it.
# `make demo` installs the runtime alone (nnabla, NumPy, h5py, protobuf); `make test` adds the test
# extra, whose nnabla-converter pulls in TensorFlow (about 2.5 GB). Each has its own marker, so
# either may come first and neither reinstalls what the other installed.
PYTHON ?= python3.10
VENV   := .venv
PY     := $(VENV)/bin/python
RUNTIME_MARKER := $(VENV)/.installed-runtime
TEST_MARKER    := $(VENV)/.installed-test
BENCH_MARKER   := $(VENV)/.installed-bench

.PHONY: install install-test demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUNTIME_MARKER): setup.py pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

# the test extra includes the runtime, so its install brings the runtime's marker up to date too
$(TEST_MARKER): setup.py pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(RUNTIME_MARKER)

install: $(RUNTIME_MARKER)

install-test: $(TEST_MARKER)

demo: install
	$(PY) -m bnfold_gpu.demo

test: install-test
	$(PY) -m pytest -q tests

# the bench extra (matplotlib, for the plot) includes the runtime, as the test extra does
$(BENCH_MARKER): setup.py pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@ $(RUNTIME_MARKER)

# writes bench/results/cpu-DATE.json and its plot, cpu-DATE.png; the README test compares only
# committed results with the README
bench: $(BENCH_MARKER)
	$(PY) bench/bench_cpu.py --out bench/results/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
