#!/usr/bin/env bash
# `make skaffold-local`: the local cluster up (tests/cluster), the skaffold dev-loop test
# (tests/skaffold) against it, the cluster down again, whatever happened.
# PYTHON: the project's interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
source tests/images/docker-engine.sh
docker_engine_up || { echo "skaffold-local: no Docker engine" >&2; exit 1; }
export DOCKER_HOST=${DOCKER_HOST:-}
trap 'PYTHON=$PYTHON bash tests/cluster/cluster.sh down; docker_engine_down' EXIT
PYTHON=$PYTHON bash tests/cluster/cluster.sh up
t0=$SECONDS rc=0
SKAFFOLD_PROFILE=local E2E_KUBECONFIG=${CQRS_CLUSTER_DIR:-/var/lib/cqrs-cluster}/admin.kubeconfig \
    "$PYTHON" -m pytest tests/skaffold -v -rs -p no:cacheprovider "$@" || rc=$?
echo "skaffold-local: the dev-loop test finished in $((SECONDS - t0)) s (exit $rc)"
exit $rc
