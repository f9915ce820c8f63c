#!/usr/bin/env bash
# The kind cluster of the dev loop and of `make e2e`.
#
#   kind.sh up     create the cluster (kept if it exists, unless an interrupted creation of
#                  this clone left it half-made: then it is made again); context
#                  kind-$KIND_CLUSTER_NAME in the default kubeconfig (for skaffold) and a
#                  standalone kubeconfig at .cache/kind/<name>.kubeconfig (for the e2e suite)
#   kind.sh load   load our images (and the dev database images, if Docker has them)
#   kind.sh down   delete the cluster
#   kind.sh e2e    build the images, create a cluster of its own (below), load, run tests/e2e,
#                  delete that cluster (whatever happened)
#   kind.sh dev    up, then `skaffold dev --profile kind --port-forward` (tests/e2e/dev.sh); on
#                  an offline node (ours), with the offline dev database images, loaded
#   kind.sh run    the same, once: `skaffold run` (tests/e2e/dev.sh run; dev.sh delete undoes it)
#
# Offline or not is a property of the node image: ours (built by build-node.sh) carries the
# label dev.cqrs-stack.kind-node.inputs-sha256, and its nodes cannot pull. Then the dev
# databases are our images of tests/cluster/images (values-local.yaml; built and loaded);
# with any other node image (kindest/node where pulling works) the chart's defaults.
#
# Ownership: `e2e` uses a cluster name of its own per clone (cqrs-e2e-<hash of the clone's
# path>), never the dev loop's `cqrs`; it deletes only a cluster it created (marker
# .cache/kind/<name>.ours) and refuses to run when the name is taken by any other cluster.
# A Ctrl-C (SIGINT/SIGTERM) during `kind create cluster` deletes the half-made cluster.
#
# Docker: a reachable engine, else the private one of tests/images/docker-engine.sh (started
# here if needed; `e2e` stops it again if it started it, `up` and `dev` leave it running).
#
# Environment:
#   KIND_CLUSTER_NAME   cluster name of up/load/down/dev (default: cqrs)
#   KIND_E2E_CLUSTER_NAME cluster name of e2e (default: cqrs-e2e-<hash of the clone's path>)
#   KIND_NODE_IMAGE     node image (default: our offline one, cqrs-kind-node:v1.34.4, built
#                       and cached by tests/images/kind/build-node.sh; kindest/node:<version>
#                       picks kind's own where it can be pulled)
#   E2E_IMAGES          images to load (default: cqrs-stack:0.1.0 cqrs-stack-operator:0.1.0)
#   E2E_EXTRA_IMAGES    more images to load when Docker has them (default: the dev PostgreSQL
#                       and Redis images: on an offline node ours from tests/cluster/images,
#                       built here, selected by values-local.yaml; else the chart's defaults)
#   E2E_KEEP_CLUSTER    1: `e2e` leaves its cluster up (the next `e2e` deletes and recreates it)
#   E2E_REQUIRE_CLUSTER 1: `e2e` fails when no cluster can be made (default: the suite
#                       runs and skips, saying why)
#   PYTHON              the test interpreter (default: .venv/bin/python)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NAME=${KIND_CLUSTER_NAME:-cqrs}
STATE=$REPO/.cache/kind
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
IMAGES=${E2E_IMAGES:-cqrs-stack:0.1.0 cqrs-stack-operator:0.1.0}
# The label our offline node image carries (tests/images/kind/build-node.sh).
NODE_LABEL=dev.cqrs-stack.kind-node.inputs-sha256
OFFLINE_DB_IMAGES="cqrs-stack-postgresql:15 cqrs-stack-redis:7"
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

kubeconfig_file() { echo "$STATE/$NAME.kubeconfig"; }

# node_is_ours: the cluster's node runs our offline node image (the label is on the container).
node_is_ours() {
  [[ -n $(docker inspect -f "{{index .Config.Labels \"$NODE_LABEL\"}}" "$NAME-control-plane" \
    2>/dev/null) ]]
}

# offline_mode: set EXTRA_IMAGES (and, offline, E2E_HELM_ARGS) by the node of the cluster.
offline_mode() {
  if node_is_ours; then
    OFFLINE=1
    EXTRA_IMAGES=${E2E_EXTRA_IMAGES:-$OFFLINE_DB_IMAGES}
    export E2E_HELM_ARGS="-f $REPO/tests/cluster/values-local.yaml ${E2E_HELM_ARGS:-}"
  else
    OFFLINE=0
    EXTRA_IMAGES=${E2E_EXTRA_IMAGES:-postgres:16 redis:7.2-alpine}
  fi
}

# node_image: KIND_NODE_IMAGE, else ours, built (cached) here. A failed build ends the script
# with its own reason (exit, not return: callers run `up` in an `if`, where set -e is off).
node_image() {
  if [[ -n ${KIND_NODE_IMAGE:-} ]]; then return 0; fi
  KIND_NODE_IMAGE=$(bash "$REPO/tests/images/kind/build-node.sh" | tail -n 1) \
    && [[ -n $KIND_NODE_IMAGE ]] \
    || { say "building the offline kind node image failed (tests/images/kind/build-node.sh, above)"; exit 1; }
}

# interrupted_create: SIGINT/SIGTERM while kind creates the cluster: delete the half-made one.
interrupted_create() {
  trap - INT TERM
  say "interrupted while creating cluster $NAME: deleting it"
  kind delete cluster --name "$NAME" >&2 || true
  rm -f "$STATE/$NAME.creating" "$STATE/$NAME.ours" "$(kubeconfig_file)"
  exit 130
}

# up: create the cluster; on failure, kind's last error line goes to $STATE/unavailable.
up() {
  need_tools
  mkdir -p "$STATE"
  rm -f "$STATE/unavailable"
  if exists && [[ -e $STATE/$NAME.creating ]]; then
    # Made by this clone, its creation never finished (killed): not usable, made again.
    say "cluster $NAME is a creation of this clone that never finished: deleting it"
    kind delete cluster --name "$NAME" >&2
  fi
  if exists; then
    say "cluster $NAME exists; using it"
  else
    node_image
    local args=(create cluster --name "$NAME" --wait 180s --image "$KIND_NODE_IMAGE")
    # Ours from here on (the marker first: a SIGKILL leaves it, and the next run knows).
    touch "$STATE/$NAME.ours" "$STATE/$NAME.creating"
    trap interrupted_create INT TERM
    if ! kind "${args[@]}" 2>&1 | tee "$STATE/create.log"; then
      trap - INT TERM
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
      # kind deletes what it made on a failure; what it left is not usable either.
      kind delete cluster --name "$NAME" >/dev/null 2>&1 || true
      rm -f "$STATE/$NAME.creating" "$STATE/$NAME.ours"
      say "kind could not create cluster $NAME (log: $STATE/create.log)"
      return 1
    fi
    trap - INT TERM
    rm -f "$STATE/$NAME.creating"
  fi
  kind get kubeconfig --name "$NAME" >"$(kubeconfig_file)" || return 1
  say "cluster $NAME up: context kind-$NAME, kubeconfig $(kubeconfig_file)," \
    "Docker at ${DOCKER_HOST:-the default socket}"
}

load() {
  local image
  # shellcheck disable=SC2086 # lists of image names
  kind load docker-image --name "$NAME" $IMAGES
  load_extra
}

# load_extra: the dev databases' images, where Docker has them (else the node pulls them).
load_extra() {
  local image
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
  rm -f "$(kubeconfig_file)" "$STATE/$NAME.ours" "$STATE/$NAME.creating"
}

# down_ours: delete the cluster only if this clone created it.
down_ours() {
  if [[ -e $STATE/$NAME.ours ]]; then
    down
  elif exists; then
    say "cluster $NAME was not created by this run: left as it is"
  fi
}

run_suite() {
  "$PYTHON" -m pytest "$REPO/tests/e2e" -v -rs -p no:cacheprovider "$@"
}

finish() {
  [[ ${E2E_KEEP_CLUSTER:-0} == 1 ]] || down_ours
  docker_engine_down
}

# dev_db_images: the dev databases' images of tests/cluster/images (offline base + Debian).
dev_db_images() {
  DOCKER=docker bash "$REPO/tests/cluster/db-images.sh"
}

# load_previous: the previous release's images (tests/cluster/previous-release.sh, built from a
# git worktree of CQRS_PREVIOUS_REF) loaded into the node, and its chart named for the upgrade
# test (tests/e2e/test_e2e_upgrade.py), as the local cluster's e2e does.
load_previous() {
  # shellcheck source=tests/cluster/previous-release.env
  source "$REPO/tests/cluster/previous-release.env"
  if [[ -z $CQRS_PREVIOUS_REF ]]; then
    say "no previous release (CQRS_PREVIOUS_REF is empty): the upgrade test skips"
    return 0
  fi
  local tag
  tag=$(cd "$REPO" && DOCKER=docker bash tests/cluster/previous-release.sh)
  kind load docker-image --name "$NAME" "cqrs-stack:$tag" "cqrs-stack-operator:$tag"
  export E2E_PREVIOUS_CHART=$REPO/.cache/previous-release/charts/cqrs-stack E2E_PREVIOUS_TAG=$tag
}

# e2e_name: the e2e suite's own cluster name, one per clone (the hash of its path), so that
# it never runs in (nor deletes) the dev loop's `cqrs` or another clone's cluster.
e2e_name() {
  echo "${KIND_E2E_CLUSTER_NAME:-cqrs-e2e-$(printf '%s' "$REPO" | sha256sum | cut -c1-8)}"
}

e2e() {
  NAME=$(e2e_name)
  need_tools
  # The engine is ours (or the caller's) for the whole run: `make images` uses it too.
  trap docker_engine_down EXIT
  mkdir -p "$STATE"
  if exists; then
    if [[ ! -e $STATE/$NAME.ours ]]; then
      say "a kind cluster $NAME exists that this clone did not create: not using it, not" \
        "deleting it (delete it with \`kind delete cluster --name $NAME\`, or set" \
        "KIND_E2E_CLUSTER_NAME)"
      exit 1
    fi
    say "cluster $NAME is left from an earlier e2e run of this clone: deleting it"
    down
  fi
  "${MAKE:-make}" -C "$REPO" images
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
  offline_mode
  if ((OFFLINE)); then dev_db_images; fi
  load
  load_previous
  E2E_KUBECONFIG=$(kubeconfig_file) run_suite "$@"
}

# dev_prepare: up; on our offline node the dev databases' images, built and loaded, and the
# skaffold profile offline-databases (values-local.yaml) that selects them.
dev_prepare() {
  up
  offline_mode
  if ((OFFLINE)); then
    dev_db_images
    load_extra
    export CQRS_OFFLINE_DATABASES=1
  fi
}

dev() {
  dev_prepare
  # skaffold dev with the cleanup that leaves nothing behind on Ctrl-C (dev.sh).
  bash "$REPO/tests/e2e/dev.sh" dev kind --port-forward "$@"
}

case ${1:-} in
  up) up ;;
  dev) shift; dev "$@" ;;
  run) shift; dev_prepare; bash "$REPO/tests/e2e/dev.sh" run kind "$@" ;;
  load) need_tools; offline_mode; load ;;
  down) down ;;
  e2e) shift; e2e "$@" ;;
  *) echo "usage: $0 up|load|down|e2e [pytest args]|dev|run [skaffold args]" >&2; exit 2 ;;
esac
