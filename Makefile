# Set-up and entry points. Every target creates .venv on first use and installs into it.
# TORCH picks the torch build: the default pins the CPU build available on our CI machines;
# on a GPU machine run e.g. `make test TORCH=torch` to take the registry's CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core; 0 runs the suite in this process.
PYTEST_WORKERS ?= auto

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,examples]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/language_model.py

# tests/ and the package's docstring examples (testpaths and --doctest-modules in pyproject.toml).
test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# ruff on everything; mypy on the package (configured in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check lightning_moe tests examples benchmarks conftest.py
	$(VENV)/bin/mypy lightning_moe

bench: install
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) lightning_logs build *.egg-info
