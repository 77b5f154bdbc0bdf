# The single source of truth for building, testing and measuring mpubsub.
PYTHON ?= python3
VENV ?= .venv
CREDENTIALS ?= $(HOME)/.mpubsub.pckl
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint run bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint,daemon]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check mpubsub tests benchmarks examples
	$(PY) -m ruff format --check mpubsub tests benchmarks examples
	$(PY) -m mypy

run: $(STAMP)
	$(PY) -m mpubsub.broker --overwrite $(CREDENTIALS)

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .bench-venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
