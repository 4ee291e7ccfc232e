# dens: `make test` and `make demo` work from a fresh clone; every install step lives here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test lint bench clean

setup: $(STAMP)

# Reinstall when the dependency list changes. torch/torchvision come from the package index as
# ordinary dependencies (their CUDA wheels also run on CPU machines).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
