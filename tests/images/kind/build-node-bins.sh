#!/usr/bin/env bash
# Build what a kind node adds to the local cluster's binaries, from Go sources through the
# module proxy, cached in $REPO/.cache/bin with stamps (build-k8s-tools.sh's technique):
#   kubeadm   k8s.io/kubernetes/cmd/kubeadm, same version as the other Kubernetes binaries
#   crictl    sigs.k8s.io/cri-tools (what kind's images/base installs)
set -euo pipefail
# shellcheck source=../../tools/build-k8s-tools.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../tools/build-k8s-tools.sh"

# kind v0.33's base image installs crictl v1.36; v1.34 is the release of our Kubernetes.
CRICTL_MODULE=sigs.k8s.io/cri-tools
CRICTL_VERSION=v1.34.0

if is_cached kubeadm "kubeadm $K8S_MODULE $K8S_VERSION"; then
  report kubeadm "cached ($K8S_VERSION)"
else
  build_k8s_commands kubeadm
fi

stamp="crictl $CRICTL_MODULE $CRICTL_VERSION"
if is_cached crictl "$stamp"; then
  report crictl "cached ($CRICTL_VERSION)"
else
  start=$SECONDS
  dir=$(new_wrapper crictl)
  out=$(partial_path crictl)
  gomod=$(go_mod_of "$dir" "$CRICTL_MODULE@$CRICTL_VERSION")
  {
    echo "module cqrs-stack/k8s-tools/crictl"
    echo "go $(go_directive)"
    echo "require $CRICTL_MODULE $CRICTL_VERSION"
    local_replaces "$gomod" "$CRICTL_VERSION"
  } >"$dir/go.mod"
  (cd "$dir" && "$GO" build "${GO_BUILD_FLAGS[@]}" \
    -ldflags "-s -w -X $CRICTL_MODULE/internal/version.Version=$CRICTL_VERSION" \
    -o "$out" "$CRICTL_MODULE/cmd/crictl")
  install_built crictl "$out" "$stamp"
  report crictl "built $CRICTL_VERSION in $((SECONDS - start)) s"
fi
