# chouette-relay: every target an operator or a developer needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# kustomize renders the deploy/k8s overlays in the manifest tests; built from source with Go
# (v5.8.2 is the newest release that builds with Go 1.26), into .cache/bin.
KUSTOMIZE_VERSION := v5.8.2
TOOLS := $(CURDIR)/.cache/bin
KUSTOMIZE_STAMP := $(TOOLS)/.kustomize-$(KUSTOMIZE_VERSION)


UV := $(BIN)/uv
# uv resolves and installs; it never downloads a Python of its own (only package registries are
# reachable from CI and developer machines).
export UV_PYTHON_DOWNLOADS := never
# `make lock UPGRADE=1` moves every pin to the newest version pyproject.toml allows.
COMPILE = $(UV) pip compile --quiet --universal --generate-hashes --python-version 3.11 \
	--custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade,)

.PHONY: help install lock sbom image-venv run kafka sandbox test test-unit test-integration lint typecheck bench plan k8s-check prometheusrule clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-17s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# uv itself comes from the registry, pinned by hash like everything else.
$(UV): requirements/uv.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
	@touch $(UV)

# The locked runtime, dev and local dependencies and build tools, exactly (what the locks dropped is
# removed), then the relay itself, editable. Runs again only when a lock or pyproject.toml changes.
$(STAMP): $(UV) pyproject.toml requirements/dev.txt requirements/build.txt
	$(UV) pip sync --quiet --python $(BIN)/python --require-hashes \
	  requirements/dev.txt requirements/build.txt requirements/uv.txt
	$(BIN)/pip install -qq --no-deps --no-build-isolation -e .
	@touch $(STAMP)

$(KUSTOMIZE_STAMP):
	@if command -v go >/dev/null 2>&1; then \
	  echo "building kustomize $(KUSTOMIZE_VERSION) into .cache/bin (a few minutes the first time)"; \
	  mkdir -p $(TOOLS) && GOBIN=$(TOOLS) go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION) \
	    && touch $@; \
	else \
	  echo "go not found: the Kubernetes manifest tests will be skipped (install Go to build kustomize)"; \
	fi

install: $(STAMP) $(KUSTOMIZE_STAMP) ## Create the virtualenv from the locks, install the relay, Kafka jars, promtool, kustomize
	$(BIN)/python -m consumer.local.kafka fetch
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing promtool (Debian package prometheus) for the alert rule tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "promtool not found: the alert rule tests will be skipped (install the prometheus package)"; \
	  fi; }

lock: $(UV) ## Re-resolve requirements/*.txt (with hashes) from pyproject.toml; UPGRADE=1 for newest
	$(COMPILE) pyproject.toml -o requirements/runtime.txt
	$(COMPILE) pyproject.toml --extra dev --extra local -c requirements/runtime.txt \
	  -o requirements/dev.txt
	$(COMPILE) requirements/build.in -o requirements/build.txt
	$(COMPILE) requirements/uv.in -o requirements/uv.txt

sbom: install ## CycloneDX SBOM of the image's dependencies (the runtime lock) into dist/
	@mkdir -p dist
	@# Requirements carry no dependency graph; cyclonedx-py warns about it, which says nothing new.
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/cyclonedx-py requirements --pyproject pyproject.toml \
	  --output-reproducible --output-format JSON --output-file dist/chouette-relay.cdx.json \
	  requirements/runtime.txt
	@echo "dist/chouette-relay.cdx.json"

image-venv: ## Build the image's virtualenv as the Dockerfile does, into IMAGE_VENV (default: a temp dir)
	sh docker/build-venv.sh . $(or $(IMAGE_VENV),$$(mktemp -d)/venv)

run: install ## Run the relay; with no Kafka/partner settings, on the local broker, sandbox and demo (DEMO_DOCUMENTS=N: an agency to onboard; KEEP=1: keep the broker's data)
	$(BIN)/chouette-relay run $(if $(DEMO_DOCUMENTS),--demo-documents $(DEMO_DOCUMENTS),) $(if $(KEEP),--keep-data,)

kafka: install ## Run the local single-node Kafka (KRaft) in the foreground
	$(BIN)/python -m consumer.local.kafka run

sandbox: install ## Run the ChouetteCopro sandbox alone in the foreground (demo account)
	$(BIN)/python -m consumer.local.sandbox

# The suite's files run on TEST_WORKERS processes (most integration tests wait on the broker and
# the loopback servers, not the CPU), all against one local broker; TEST_WORKERS=0 runs them in
# this process alone.
TEST_WORKERS ?= 3

test: install lint typecheck ## The whole suite: lint, type check, unit and integration tests (TEST_WORKERS=3)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-unit: install ## Unit tests only (no broker)
	$(BIN)/pytest -q tests/unit

test-integration: install ## Integration tests (real local Kafka, loopback HTTP servers; TEST_WORKERS=3)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile tests/integration

lint: install ## ruff lint and format check, and the import layering contracts (lint-imports)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install ## mypy --strict over the package, tests and benchmarks
	$(BIN)/mypy

bench: install ## Benchmarks, each beside its baseline (QUICK=1: a tenth of the sizes, the pure core's aside)
	$(if $(QUICK),BENCH_SCALE=0.1 ,)$(BIN)/python -m bench

# With no Kafka settings in the environment, the plan is of the local stack of `make run`, through
# the operator.env it writes; the plan of a real cluster needs its settings exported.
plan: install ## Dry-run of a first publication (AGENCY=id to narrow); sends nothing. Needs the Kafka settings, or a `make run` up in this folder
	@if [ -z "$$CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS" ] && [ -f var/local/operator.env ]; then \
	  . var/local/operator.env; fi; \
	if [ -z "$$CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS" ]; then \
	  echo "make plan: no Kafka settings: start \`make run\` in this folder first, or export the CHOUETTE_RELAY_* settings of your cluster" >&2; exit 2; fi; \
	$(BIN)/chouette-relay plan $(if $(AGENCY),--agency $(AGENCY),)

k8s-check: install ## Render the k8s overlays and validate them, the alert rules and the dashboard offline
	$(BIN)/python deploy/k8s/prometheusrule.py --check
	$(BIN)/pytest -q tests/integration/test_deploy.py tests/integration/test_k8s.py tests/integration/test_k8s_platform.py

prometheusrule: install ## Regenerate deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yaml
	$(BIN)/python deploy/k8s/prometheusrule.py

clean: ## Remove the virtualenv, caches and local data (keeps downloaded Kafka jars)
	rm -rf $(VENV) dist .mypy_cache .ruff_cache .pytest_cache .import_linter_cache .hypothesis var
