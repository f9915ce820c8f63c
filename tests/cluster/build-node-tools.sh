#!/usr/bin/env bash
# Build what the local cluster (tests/cluster/cluster.sh) adds to the tools that
# tests/tools/build-k8s-tools.sh makes: kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy (same Kubernetes version, same wrapper module) and CoreDNS, all from Go
# sources through the module proxy, cached in $REPO/.cache/bin with stamp files.
#
# The wrapper-module technique, the pins and the stamps are build-k8s-tools.sh's own:
# this script sources it (its main part does not run when sourced) and calls its
# functions, so both scripts always agree on versions and flags.
#
# Environment: as build-k8s-tools.sh (K8S_TOOLS_BIN_DIR, GO).
set -euo pipefail

# shellcheck source=../tools/build-k8s-tools.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/build-k8s-tools.sh"

# CoreDNS answers the cluster's Service names (cluster.local) for pods. 1.14 watches
# EndpointSlices, which is what Kubernetes 1.34 serves.
COREDNS_MODULE=github.com/coredns/coredns
COREDNS_VERSION=v1.14.7

NODE_TOOLS=(kube-controller-manager kube-scheduler kubelet kube-proxy)

build_node_tools() {
  local want=() tool
  for tool in "${NODE_TOOLS[@]}"; do
    if is_cached "$tool" "$tool $K8S_MODULE $K8S_VERSION"; then
      report "$tool" "cached ($K8S_VERSION)"
    else
      want+=("$tool")
    fi
  done
  ((${#want[@]})) || return 0
  build_k8s_commands "${want[@]}"
}

build_coredns() {
  local stamp="coredns $COREDNS_MODULE $COREDNS_VERSION"
  if is_cached coredns "$stamp"; then report coredns "cached ($COREDNS_VERSION)"; return; fi
  local start=$SECONDS dir gomod out
  dir=$(new_wrapper coredns)
  out=$(partial_path coredns)
  gomod=$(go_mod_of "$dir" "$COREDNS_MODULE@$COREDNS_VERSION")
  {
    echo "module cqrs-stack/k8s-tools/coredns"
    echo "go $(go_directive)"
    echo "require $COREDNS_MODULE $COREDNS_VERSION"
    local_replaces "$gomod" "$COREDNS_VERSION"
  } >"$dir/go.mod"
  # The module root is CoreDNS's `package main` (its default plugin set, kubernetes
  # included). GitCommit is what `coredns -version` prints.
  (cd "$dir" && "$GO" build "${GO_BUILD_FLAGS[@]}" \
    -ldflags "-s -w -X $COREDNS_MODULE/coremain.GitCommit=$COREDNS_VERSION" \
    -o "$out" "$COREDNS_MODULE")
  install_built coredns "$out" "$stamp"
  report coredns "built $COREDNS_VERSION in $((SECONDS - start)) s"
}

build_node_tools
build_coredns
