# One entry per habit. `make quickstart` runs the relay; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv quickstart run test lint format typecheck clean cluster-tools cluster cluster-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $@

venv: $(STAMP)

quickstart: venv
	scripts/quickstart.sh

run: venv
	$(BIN)/smtp-relay serve

test: venv
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check relay tests
	$(BIN)/ruff format --check relay tests

format: venv
	$(BIN)/ruff format relay tests
	$(BIN)/ruff check --fix relay tests

typecheck: venv
	$(BIN)/mypy

# The test Kubernetes control plane, built from the official Go modules into
# ~/.cache/smtp-relay-tools (a cold build takes about 8 minutes on 2 cores).
cluster-tools:
	hack/cluster/build.sh

cluster: cluster-tools
	hack/cluster/up.sh

cluster-down:
	hack/cluster/down.sh

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
