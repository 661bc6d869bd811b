# One entry per habit. `make quickstart` runs the relay; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv quickstart run test lint format typecheck clean cluster-tools cluster cluster-down \
	bench crds e2e

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
	$(BIN)/ruff check relay operator tests bench
	$(BIN)/ruff format --check relay operator tests

format: venv
	$(BIN)/ruff format relay operator tests
	$(BIN)/ruff check --fix relay operator tests

typecheck: venv
	$(BIN)/mypy

# Regenerate crds/ and the chart's copy from the pydantic models (a test checks for drift).
crds: venv
	$(BIN)/python -m relay_operator.crdgen

# Only the tests that run against the test Kubernetes control plane.
e2e: venv cluster-tools
	$(BIN)/pytest -m cluster

# Benchmarks against a private Postfix on this machine (docs/benchmarks.md); as root.
# BENCH_SCALE=1 runs the issue's full sizes (100,000-message drain, 10-minute soak).
bench: venv
	$(BIN)/python -m bench.run all

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
