#!/usr/bin/env bash
# The kind cluster of the dev loop and of `make e2e`.
#
#   kind.sh up     create the cluster (kept if it exists); context kind-$KIND_CLUSTER_NAME in
#                  the default kubeconfig (for skaffold) and a standalone kubeconfig at
#                  .cache/kind/$KIND_CLUSTER_NAME.kubeconfig (for the e2e suite)
#   kind.sh load   load our images (and the dev database images, if Docker has them)
#   kind.sh down   delete the cluster
#   kind.sh e2e    build the images, up, load, run tests/e2e, down (whatever happened)
#   kind.sh dev    up, then `skaffold dev --profile kind --port-forward` (tests/e2e/dev.sh)
#
# Docker: a reachable engine, else the private one of tests/images/docker-engine.sh (started
# here if needed; `e2e` stops it again if it started it, `up` and `dev` leave it running).
#
# Environment:
#   KIND_CLUSTER_NAME   cluster name (default: cqrs)
#   KIND_NODE_IMAGE     node image (default: our offline one, cqrs-kind-node:v1.34.4, built
#                       and cached by tests/images/kind/build-node.sh; kindest/node:<version>
#                       picks kind's own where it can be pulled)
#   E2E_IMAGES          images to load (default: cqrs-stack:0.1.0 cqrs-stack-operator:0.1.0)
#   E2E_EXTRA_IMAGES    more images to load when Docker has them (default: the chart's dev
#                       PostgreSQL and Redis images; with the offline node image, ours from
#                       tests/cluster/images, built here, selected by values-local.yaml)
#   E2E_KEEP_CLUSTER    1: `e2e` leaves the cluster up
#   E2E_REQUIRE_CLUSTER 1: `e2e` fails when no cluster can be made (default: the suite
#                       runs and skips, saying why)
#   PYTHON              the test interpreter (default: .venv/bin/python)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NAME=${KIND_CLUSTER_NAME:-cqrs}
STATE=$REPO/.cache/kind
KUBECONFIG_FILE=$STATE/$NAME.kubeconfig
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
IMAGES=${E2E_IMAGES:-cqrs-stack:0.1.0 cqrs-stack-operator:0.1.0}
OFFLINE=0
if [[ -z ${KIND_NODE_IMAGE:-} ]]; then OFFLINE=1; fi
if ((OFFLINE)); then
  EXTRA_IMAGES=${E2E_EXTRA_IMAGES:-cqrs-stack-postgresql:15 cqrs-stack-redis:7}
  export E2E_HELM_ARGS="-f $REPO/tests/cluster/values-local.yaml ${E2E_HELM_ARGS:-}"
else
  EXTRA_IMAGES=${E2E_EXTRA_IMAGES:-postgres:16 redis:7.2-alpine}
fi
export PATH=$REPO/.cache/bin:$PATH
# shellcheck source=tests/images/docker-engine.sh
source "$REPO/tests/images/docker-engine.sh"

say() { echo "kind.sh: $*" >&2; }

# need_tools: kind, and a Docker engine (once: docker_engine_up forgets that it started
# the engine when called again).
need_tools() {
  [[ -z ${TOOLS_READY:-} ]] || return 0
  command -v kind >/dev/null || { say "kind is not built: run make dev-tools"; exit 1; }
  docker_engine_up || { say "no Docker engine: kind cannot run"; exit 1; }
  TOOLS_READY=1
}

exists() { kind get clusters 2>/dev/null | grep -qx "$NAME"; }

# up: create the cluster; on failure, kind's last error line goes to $STATE/unavailable.
up() {
  need_tools
  mkdir -p "$STATE"
  rm -f "$STATE/unavailable"
  if exists; then
    say "cluster $NAME exists; using it"
  else
    if [[ -z ${KIND_NODE_IMAGE:-} ]]; then
      # Our node image, built offline once per machine (cached by its inputs' hash).
      KIND_NODE_IMAGE=$(bash "$REPO/tests/images/kind/build-node.sh" | tail -n 1)
    fi
    local args=(create cluster --name "$NAME" --wait 180s --image "$KIND_NODE_IMAGE")
    if ! kind "${args[@]}" 2>&1 | tee "$STATE/create.log"; then
      # kind's error, without the command it ran, and the daemon's answer.
      grep -E '^ERROR|Error response' "$STATE/create.log" | tail -n 2 \
        | sed -e 's/^ERROR: //; s/: command "[^"]*" failed with error: exit status [0-9]*//' \
          -e 's/^Command Output: //' | paste -sd ' ' >"$STATE/unavailable"
      if grep -q 'unable to apply caps' "$STATE/create.log"; then
        # An engine without tests/images/runc-bounded, on a machine whose root lacks a
        # capability (tests/e2e/README.md): privileged containers cannot start there.
        echo " (the Docker engine must run containers with tests/images/runc-bounded:" \
          "stop it; docker-engine.sh starts one that does)" >>"$STATE/unavailable"
      fi
      say "kind could not create cluster $NAME (log: $STATE/create.log)"
      return 1
    fi
  fi
  kind get kubeconfig --name "$NAME" >"$KUBECONFIG_FILE"
  say "cluster $NAME up: context kind-$NAME, kubeconfig $KUBECONFIG_FILE," \
    "Docker at ${DOCKER_HOST:-the default socket}"
}

load() {
  local image
  # shellcheck disable=SC2086 # lists of image names
  kind load docker-image --name "$NAME" $IMAGES
  for image in $EXTRA_IMAGES; do
    if docker image inspect "$image" >/dev/null 2>&1; then
      kind load docker-image --name "$NAME" "$image"
    else
      say "$image is not in Docker: the node pulls it (offline: pass E2E_HELM_ARGS to the chart)"
    fi
  done
}

down() {
  need_tools
  if exists; then kind delete cluster --name "$NAME"; fi
  rm -f "$KUBECONFIG_FILE"
}

run_suite() {
  "$PYTHON" -m pytest "$REPO/tests/e2e" -v -rs -p no:cacheprovider "$@"
}

finish() {
  [[ ${E2E_KEEP_CLUSTER:-0} == 1 ]] || down
  docker_engine_down
}

# dev_db_images: the dev databases' images of tests/cluster/images (offline base + Debian).
dev_db_images() {
  local base=${BASE_IMAGE:-cqrs-stack-base:bookworm} which
  for which in postgresql:15 redis:7; do
    DOCKER_BUILDKIT=0 docker build -q --network host -f "$REPO/tests/cluster/images/${which%%:*}.Dockerfile" \
      -t "cqrs-stack-$which" --build-arg BASE_IMAGE="$base" "$REPO/tests/cluster/images" >/dev/null
  done
}

e2e() {
  need_tools
  # The engine is ours (or the caller's) for the whole run: `make images` uses it too.
  trap docker_engine_down EXIT
  "${MAKE:-make}" -C "$REPO" images
  if ((OFFLINE)); then dev_db_images; fi
  if ! up; then
    local reason
    reason="kind create cluster failed: $(cat "$STATE/unavailable" 2>/dev/null)"
    if [[ ${E2E_REQUIRE_CLUSTER:-0} == 1 ]]; then
      say "$reason"
      exit 1
    fi
    E2E_NO_CLUSTER_REASON=$reason run_suite "$@"
    return
  fi
  trap finish EXIT
  load
  E2E_KUBECONFIG=$KUBECONFIG_FILE run_suite "$@"
}

dev() {
  up
  # skaffold dev with the cleanup that leaves nothing behind on Ctrl-C (dev.sh).
  bash "$REPO/tests/e2e/dev.sh" dev kind --port-forward "$@"
}

case ${1:-} in
  up) up ;;
  dev) shift; dev "$@" ;;
  load) need_tools; load ;;
  down) down ;;
  e2e) shift; e2e "$@" ;;
  *) echo "usage: $0 up|load|down|e2e [pytest args]|dev [skaffold args]" >&2; exit 2 ;;
esac
