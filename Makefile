# grad2-serve — the two README commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GRAD2_CACHE ?= $(CURDIR)/.cache

.PHONY: demo test unit integration lint prereqs setup data wheel clean

demo: setup data
	$(BIN)/grad2 demo

test: setup data lint
	$(BIN)/python -m pytest -q tests integration_tests

unit: setup
	$(BIN)/python -m pytest -q tests

integration: setup data
	$(BIN)/python -m pytest -q integration_tests

lint: setup
	$(BIN)/ruff check .

setup: prereqs $(STAMP)

prereqs:
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: $(PYTHON) not found. Install Python 3.11 (e.g. 'apt-get install python3.11 python3.11-venv'" \
	       "or 'pyenv install 3.11') or run 'make PYTHON=/path/to/python3.11 ...'."; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
	  echo "error: $(PYTHON) is not Python 3.11 (TorchServe 0.12 and the pinned torch need 3.11)."; exit 1; }
	@command -v java >/dev/null 2>&1 || { \
	  echo "error: java not found. TorchServe needs a JDK >= 11: 'apt-get install openjdk-17-jdk-headless'."; exit 1; }
	@v=$$(java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -n1); \
	  [ -n "$$v" ] && [ "$$v" -ge 11 ] || { \
	  echo "error: java $$v found; TorchServe needs a JDK >= 11: 'apt-get install openjdk-17-jdk-headless'."; exit 1; }

# The package declares version ranges; this repository's environment is pinned exactly by
# constraints.txt, so every make test / make demo installs the same versions.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

data: setup
	$(BIN)/grad2 fetch-data

# The plugin's wheel, for `pip install 'dist/grad2_serve-*.whl[serve]'` on a TorchServe host.
wheel: setup
	rm -rf build dist
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -q -w dist .
	@ls dist/*.whl

clean:
	rm -rf $(VENV) .cache model_store/*.mar logs build dist
