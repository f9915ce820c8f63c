#!/usr/bin/env bash
# The skaffold dev loop on a cluster that is already up, the same on a laptop and here:
#
#   dev.sh dev    PROFILE [skaffold args]  `skaffold dev`; on exit (Ctrl-C) `delete` below
#   dev.sh run    PROFILE [skaffold args]  `skaffold run`: build, load, install once
#   dev.sh delete PROFILE                  remove what run/dev made, leaving nothing behind
#
# PROFILE: kind (the kind cluster of kind.sh, `cqrs` or KIND_CLUSTER_NAME, context
# kind-<name>; images reach the node by `kind load`) or local (the local cluster of
# tests/cluster, context cqrs-local; images are imported into its containerd by
# tests/images/skaffold-build.sh).
#
# Why `delete` is more than `skaffold delete` (= `helm uninstall`): Helm deletes the
# operator and its RBAC in the same breath as the CqrsStack, so the stack's finalizer would
# never run and the stack's Deployments would stay. The stacks go first, while the operator
# still runs; then the release; then the loop's own namespaces (cqrs-dev and the operator's
# cqrs-dev-operator, which the chart keeps on uninstall, with the dev PostgreSQL Secret).
#
# Docker: as kind.sh (a reachable engine, else the private one of docker-engine.sh, left
# running). `delete` also removes the images the loop tagged (docker-engine.sh prune_images). DEV_NAMESPACE must match skaffold.yaml's release namespace (cqrs-dev).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NAMESPACE=${DEV_NAMESPACE:-cqrs-dev}
export PATH=$REPO/.cache/bin:$PATH
export SKAFFOLD_UPDATE_CHECK=false SKAFFOLD_INTERACTIVE=false
# shellcheck source=tests/images/docker-engine.sh
source "$REPO/tests/images/docker-engine.sh"
cd "$REPO"

say() { echo "dev.sh: $*" >&2; }

target() {  # target PROFILE: the kubeconfig and context flags of that cluster
  case $1 in
    kind)
      # The cluster of kind.sh (KIND_CLUSTER_NAME, default cqrs).
      KUBE=(--context "kind-${KIND_CLUSTER_NAME:-cqrs}")
      SKAFFOLD_KUBE=(--kube-context "kind-${KIND_CLUSTER_NAME:-cqrs}")
      ;;
    local)
      local config=${CQRS_CLUSTER_DIR:-/var/lib/cqrs-cluster}/admin.kubeconfig
      [[ -f $config ]] || { say "no local cluster ($config): make cluster-up"; exit 1; }
      KUBE=(--kubeconfig "$config" --context cqrs-local)
      SKAFFOLD_KUBE=(--kubeconfig "$config" --kube-context cqrs-local)
      ;;
    *) say "unknown profile '$1' (kind or local)"; exit 2 ;;
  esac
}

delete() {
  local profile=$1
  say "deleting the stacks in $NAMESPACE first (their finalizers need the operator)"
  if kubectl "${KUBE[@]}" get namespace "$NAMESPACE" >/dev/null 2>&1; then
    kubectl "${KUBE[@]}" delete cqrsstacks --all -n "$NAMESPACE" --ignore-not-found \
      --wait --timeout=180s || say "the stacks did not go within 180 s"
  fi
  skaffold delete --profile "$profile" "${SKAFFOLD_KUBE[@]}" || say "skaffold delete failed"
  kubectl "${KUBE[@]}" delete namespace "$NAMESPACE" "$NAMESPACE-operator" --ignore-not-found \
    --wait --timeout=180s
  say "nothing of the dev loop is left in the cluster"
  # Each iteration of the loop tagged new images in the engine: none of them is needed now.
  prune_images --dev
  say "the dev loop's images are removed from the Docker engine"
}

# The profile is a global, not a local of main: the EXIT trap runs after main has returned
# when `skaffold dev` ends by itself (a failed status check, a build error), and a local
# would be gone by then (under set -u the trap would die before cleaning up anything).
PROFILE=

main() {
  local command=${1:-}
  PROFILE=${2:-}
  [[ -n $command && -n $PROFILE ]] || { echo "usage: $0 dev|run|delete kind|local [skaffold args]" >&2; exit 2; }
  shift 2
  local profile=$PROFILE
  target "$profile"
  docker_engine_up || { say "no Docker engine: skaffold cannot build"; exit 1; }
  case $command in
    run) skaffold run --profile "$profile" "${SKAFFOLD_KUBE[@]}" "$@" ;;
    dev)
      # --cleanup=false: skaffold's own cleanup is `helm uninstall` alone; ours runs instead.
      trap 'delete "$PROFILE"' EXIT
      trap 'exit 130' INT TERM
      # Ended by itself (a failed status check, a build error): its status, after the cleanup.
      local status=0
      skaffold dev --profile "$profile" "${SKAFFOLD_KUBE[@]}" --cleanup=false "$@" || status=$?
      ((status == 0)) || say "skaffold dev ended with status $status"
      exit "$status"
      ;;
    delete) delete "$profile" ;;
    *) echo "usage: $0 dev|run|delete kind|local [skaffold args]" >&2; exit 2 ;;
  esac
}

main "$@"
