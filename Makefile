# make demo / make test work on a fresh clone: they create .venv from Python 3.10 and install into it.
PYTHON ?= python3.10
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m bnfold_gpu.demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/bench_cpu.py --out bench/results/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
