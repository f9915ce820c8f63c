#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, offline (see README.md here).
#   cluster.sh up       build/cache the binaries, start the cluster, import the images
#   cluster.sh down     stop everything, remove pods, mounts, bridge, iptables chains, state
#   cluster.sh status   which processes run, whether the node is Ready
#   cluster.sh images   (re)build and import the images only
#   cluster.sh e2e [pytest args]   up, the e2e suite, down (down even when the suite fails)
# Needs root. PYTHON: the project's interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
KUBECONFIG_PATH=${CQRS_CLUSTER_DIR:-/var/lib/cqrs-cluster}/admin.kubeconfig
# shellcheck source=previous-release.env
source tests/cluster/previous-release.env

cluster() { "$PYTHON" -m tests.cluster.local_cluster "$@"; }

up() {
    local t0=$SECONDS
    nice -n 10 bash tests/tools/build-k8s-tools.sh
    nice -n 10 bash tests/cluster/build-node-tools.sh
    echo "cluster: binaries ready in $((SECONDS - t0)) s"
    cluster up
    bash tests/cluster/images.sh
    echo "cluster: up with images in $((SECONDS - t0)) s; KUBECONFIG=$KUBECONFIG_PATH"
}

e2e() {
    trap 'cluster down' EXIT
    up
    local t0=$SECONDS rc=0
    local previous=""
    [[ -n $CQRS_PREVIOUS_REF ]] && previous=$(cat .cache/previous-release.tag)
    E2E_KUBECONFIG=$KUBECONFIG_PATH \
        E2E_HELM_ARGS="-f tests/cluster/values-local.yaml ${E2E_HELM_ARGS:-}" \
        E2E_PREVIOUS_CHART=${previous:+.cache/previous-release/charts/cqrs-stack} \
        E2E_PREVIOUS_TAG=$previous \
        "$PYTHON" -m pytest tests/e2e -q -rs -p no:cacheprovider "$@" || rc=$?
    echo "cluster: e2e suite finished in $((SECONDS - t0)) s (exit $rc)"
    return $rc
}

case ${1:-} in
    up) up ;;
    down) cluster down ;;
    status) cluster status ;;
    images) bash tests/cluster/images.sh ;;
    e2e) shift; e2e "$@" ;;
    *) echo "usage: $0 up|down|status|images|e2e [pytest args]" >&2; exit 2 ;;
esac
