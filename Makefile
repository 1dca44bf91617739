# Two entry points for a newcomer: `make demo` and `make test`. Both (re)create the
# local virtualenv .venv on demand.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,flax]'
	# CUDA lowering tests on a machine without a GPU need the CUDA plugin of the same jax
	# version (it fails to initialise and jax falls back to the CPU; PALLAS_NOTES.md §2).
	$(PY) -m pip install -q "jax-cuda12-plugin==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m jaxquant.bench

clean:
	rm -rf $(VENV) build *.egg-info
