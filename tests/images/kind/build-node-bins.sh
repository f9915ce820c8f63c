#!/usr/bin/env bash
# Build what a kind node adds to the local cluster's binaries, from Go sources through the
# module proxy, cached in $REPO/.cache/bin with stamps (build-k8s-tools.sh's technique):
#   kubeadm   k8s.io/kubernetes/cmd/kubeadm, same version as the other Kubernetes binaries
#   crictl    sigs.k8s.io/cri-tools (what kind's images/base installs)
#   kindnetd  kind's CNI daemon, from kindnetd/ here (kind's images/kindnetd sources: a
#             nested module of kind's repository, which the module proxy does not serve)
#   local-path-provisioner  github.com/rancher/local-path-provisioner (kind's storage)
set -euo pipefail
# shellcheck source=../../tools/build-k8s-tools.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../tools/build-k8s-tools.sh"

# kind v0.33's base image installs crictl v1.36; v1.34 is the release of our Kubernetes.
CRICTL_MODULE=sigs.k8s.io/cri-tools
CRICTL_VERSION=v1.34.0
# kind v0.33 builds v0.0.34 into its image; the module proxy serves v0.0.30 as the newest.
LPP_MODULE=github.com/rancher/local-path-provisioner
LPP_VERSION=v0.0.30
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

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

# kindnetd: its own module (go.mod, go.sum from kind), built in place; stamped by its sources.
stamp="kindnetd kind@$(cat "$HERE/kindnetd/SOURCE") $(cat "$HERE"/kindnetd/go.* "$HERE"/kindnetd/cmd/kindnetd/*.go | sha256sum | cut -c1-16)"
if is_cached kindnetd "$stamp"; then
  report kindnetd "cached"
else
  start=$SECONDS
  out=$(partial_path kindnetd)
  (cd "$HERE/kindnetd" && "$GO" build -mod=mod -buildvcs=false -trimpath -ldflags "-s -w" \
    -o "$out" ./cmd/kindnetd)
  install_built kindnetd "$out" "$stamp"
  report kindnetd "built in $((SECONDS - start)) s"
fi

stamp="local-path-provisioner $LPP_MODULE $LPP_VERSION"
if is_cached local-path-provisioner "$stamp"; then
  report local-path-provisioner "cached ($LPP_VERSION)"
else
  start=$SECONDS
  dir=$(new_wrapper local-path-provisioner)
  out=$(partial_path local-path-provisioner)
  {
    echo "module cqrs-stack/k8s-tools/local-path-provisioner"
    echo "go $(go_directive)"
    echo "require $LPP_MODULE $LPP_VERSION"
  } >"$dir/go.mod"
  (cd "$dir" && "$GO" build "${GO_BUILD_FLAGS[@]}" -ldflags "-s -w -X main.VERSION=$LPP_VERSION" \
    -o "$out" "$LPP_MODULE")
  install_built local-path-provisioner "$out" "$stamp"
  report local-path-provisioner "built $LPP_VERSION in $((SECONDS - start)) s"
fi
