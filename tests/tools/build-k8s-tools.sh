#!/usr/bin/env bash
# Build the Kubernetes tools that the operator and chart tests run against, from Go
# sources fetched through the Go module proxy, and cache them in $REPO/.cache/bin.
#
# Prebuilt release binaries cannot be downloaded on our machines (no access to release
# pages or container registries), so etcd, kube-apiserver, helm and kubectl are
# compiled here. Each binary gets a stamp file holding its pinned version: a second run
# with unchanged pins does nothing, changing a pin rebuilds just that tool.
#
# Environment:
#   KUBEBUILDER_ASSETS  a folder that already holds etcd and kube-apiserver (and maybe
#                       kubectl): those are symlinked instead of built.
#   K8S_TOOLS_KUBECTL   set to 0 to skip kubectl (it is only needed by e2e tests).
#   K8S_TOOLS_BIN_DIR   output folder (default: $REPO/.cache/bin).
#   GO                  the go command (default: go on PATH, else /usr/local/go/bin/go).
set -euo pipefail

# ---- pinned versions ---------------------------------------------------------------
# etcd 3.6 is the series that Kubernetes 1.34 is tested with.
ETCD_MODULE=go.etcd.io/etcd/server/v3
ETCD_VERSION=v3.6.16
# v1.34.4 is the newest 1.34 patch release that the module proxy serves.
K8S_MODULE=k8s.io/kubernetes
K8S_VERSION=v1.34.4
HELM_MODULE=helm.sh/helm/v3
HELM_VERSION=v3.22.0

# ---- setup -------------------------------------------------------------------------
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN_DIR=${K8S_TOOLS_BIN_DIR:-$REPO/.cache/bin}
BUILD_KUBECTL=${K8S_TOOLS_KUBECTL:-1}

if [[ -z ${GO:-} ]]; then
  if command -v go >/dev/null 2>&1; then
    GO=$(command -v go)
  elif [[ -x /usr/local/go/bin/go ]]; then
    GO=/usr/local/go/bin/go
  else
    echo "build-k8s-tools: no go command found (install Go >= 1.26 or set GO=...)" >&2
    exit 1
  fi
fi

# The usual per-user defaults, spelled out because CI may run with a bare environment.
export GOPATH=${GOPATH:-$HOME/go}
export GOMODCACHE=${GOMODCACHE:-$GOPATH/pkg/mod}
export GOCACHE=${GOCACHE:-$HOME/.cache/go-build}
# Static binaries: they must not depend on the C library of whichever machine runs them.
export CGO_ENABLED=0
# Never fetch another Go toolchain: the one installed must do (a too-old Go fails with
# go's own clear "requires go >= X" message).
export GOTOOLCHAIN=local
# The wrapper modules below have no go.sum; -mod=mod lets go resolve and record it.
# -buildvcs=false because the temp wrapper dir is not a repository.
GO_BUILD_FLAGS=(-mod=mod -buildvcs=false -trimpath)

mkdir -p "$BIN_DIR"

# Temp wrapper modules live under one scratch folder, and partial binaries carry this
# shell's pid: both are removed however the script ends. (Helpers called as $(...)
# run in a subshell, so they cannot register paths in a variable of ours.)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/k8s-tools.XXXXXX")
cleanup() {
  rm -rf "$SCRATCH"
  rm -f "$BIN_DIR"/.*.partial.$$
}
trap cleanup EXIT

# report TOOL MESSAGE: the one line per tool that this script promises.
report() { printf '%-15s %s\n' "$1" "$2"; }

stamp_file() { echo "$BIN_DIR/.$1.stamp"; }

# is_cached TOOL STAMP: the binary exists and was made from exactly this recipe.
is_cached() {
  local tool=$1 stamp=$2 file
  file=$(stamp_file "$tool")
  [[ -x $BIN_DIR/$tool && -f $file && $(<"$file") == "$stamp" ]]
}

# partial_path TOOL: where go writes TOOL before install_built renames it into place.
# Same folder as the target, so the rename is atomic: a test starting meanwhile sees
# the old binary or the new one, never half a file.
partial_path() { echo "$BIN_DIR/.$1.partial.$$"; }

# install_built TOOL SRC STAMP: move a fresh binary into place. The old entry may be a
# symlink into KUBEBUILDER_ASSETS; mv replaces the link itself, never its target.
install_built() {
  local tool=$1 src=$2 stamp=$3
  mv -f "$src" "$BIN_DIR/$tool"
  echo "$stamp" >"$(stamp_file "$tool")"
}

# go_mod_of MODULE@VERSION: path of that module's go.mod in the module cache.
go_mod_of() {
  local json
  if ! json=$(cd "$1" && "$GO" mod download -json "$2"); then
    # go reports the reason (e.g. a version the proxy does not serve) in the JSON.
    echo "build-k8s-tools: cannot download $2:" >&2
    echo "$json" >&2
    return 1
  fi
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$json"
}

# local_replaces GOMOD NEW_VERSION: turn the replace directives that point into the
# upstream source tree (k8s staging dirs, etcd sibling dirs) into replaces to the
# published module at NEW_VERSION. Those local paths do not exist outside upstream's
# repository, which is why `go install pkg@version` refuses such modules.
local_replaces() {
  local gomod=$1 version=$2
  awk -v ver="$version" '
    /^replace[[:space:]]*\($/ { inblock = 1; next }
    inblock && /^\)/          { inblock = 0; next }
    {
      line = $0
      if (!inblock) { if (line !~ /^replace[[:space:]]/) next; sub(/^replace[[:space:]]+/, "", line) }
      n = split(line, f, /[[:space:]]+/)
      # f: [""] MODULE [VERSION] => TARGET ; only local-path targets matter
      for (i = 1; i <= n; i++) if (f[i] == "=>") break
      if (i > n) next
      mod = f[i - 1]; target = f[i + 1]
      if (target ~ /^\.\/staging\/src\// || target ~ /^\.\.\//)
        printf "replace %s => %s %s\n", mod, mod, ver
    }' "$gomod"
}

# new_wrapper NAME: a temp dir for one wrapper module, removed on exit.
new_wrapper() { mkdir "$SCRATCH/$1" && echo "$SCRATCH/$1"; }

# go_directive: the wrapper's go line. The local Go version satisfies any dependency
# that this Go can build at all.
go_directive() { "$GO" env GOVERSION | sed 's/^go//; s/-.*//'; }

# take_from_assets TOOL: symlink TOOL from KUBEBUILDER_ASSETS if it is there.
take_from_assets() {
  local tool=$1 assets=${KUBEBUILDER_ASSETS:-}
  [[ -n $assets && -x $assets/$tool ]] || return 1
  local src
  src=$(cd "$assets" && pwd)/$tool
  rm -f "$BIN_DIR/$tool"
  ln -s "$src" "$BIN_DIR/$tool"
  # A stamp that no pinned version matches: a later run without KUBEBUILDER_ASSETS
  # replaces the symlink by a built binary.
  echo "KUBEBUILDER_ASSETS $src" >"$(stamp_file "$tool")"
  report "$tool" "taken from KUBEBUILDER_ASSETS ($src)"
}

# ---- etcd --------------------------------------------------------------------------
build_etcd() {
  local stamp="etcd $ETCD_MODULE $ETCD_VERSION"
  if is_cached etcd "$stamp"; then report etcd "cached ($ETCD_VERSION)"; return; fi
  local start=$SECONDS dir gomod out
  dir=$(new_wrapper etcd)
  out=$(partial_path etcd)
  gomod=$(go_mod_of "$dir" "$ETCD_MODULE@$ETCD_VERSION")
  {
    echo "module cqrs-stack/k8s-tools/etcd"
    echo "go $(go_directive)"
    echo "require $ETCD_MODULE $ETCD_VERSION"
    local_replaces "$gomod" "$ETCD_VERSION"
  } >"$dir/go.mod"
  # The module root of etcd/server is its `package main` (a wrapper of etcdmain).
  (cd "$dir" && "$GO" build "${GO_BUILD_FLAGS[@]}" -ldflags "-s -w" -o "$out" "$ETCD_MODULE")
  install_built etcd "$out" "$stamp"
  report etcd "built $ETCD_VERSION in $((SECONDS - start)) s"
}

# ---- kube-apiserver and kubectl (one wrapper module: they share the module graph) --
build_kubernetes() {
  local want=() tool
  if [[ $ASSETS_OK == 0 ]]; then
    if is_cached kube-apiserver "kube-apiserver $K8S_MODULE $K8S_VERSION"; then
      report kube-apiserver "cached ($K8S_VERSION)"
    else
      want+=(kube-apiserver)
    fi
  fi
  if [[ $BUILD_KUBECTL != 0 ]]; then
    if is_cached kubectl "kubectl $K8S_MODULE $K8S_VERSION"; then
      report kubectl "cached ($K8S_VERSION)"
    elif ! take_from_assets kubectl; then
      want+=(kubectl)
    fi
  else
    report kubectl "skipped (K8S_TOOLS_KUBECTL=0)"
  fi
  ((${#want[@]})) || return 0
  build_k8s_commands "${want[@]}"
}

# build_k8s_commands TOOL...: build k8s.io/kubernetes/cmd/TOOL for each TOOL from one
# wrapper module (they share the module graph), stamped "TOOL k8s.io/kubernetes VERSION".
# tests/cluster/build-node-tools.sh sources this file to build the node binaries too.
build_k8s_commands() {
  local want=("$@") tool dir gomod staging_version
  dir=$(new_wrapper kubernetes)
  gomod=$(go_mod_of "$dir" "$K8S_MODULE@$K8S_VERSION")
  # Staging modules are published as k8s.io/X v0.MINOR.PATCH for kubernetes v1.MINOR.PATCH.
  staging_version=v0.${K8S_VERSION#v1.}
  {
    echo "module cqrs-stack/k8s-tools/kubernetes"
    echo "go $(go_directive)"
    # Keep upstream's GODEBUG defaults (only the main module's godebug line counts).
    grep -E '^godebug[[:space:]]' "$gomod" || true
    echo "require $K8S_MODULE $K8S_VERSION"
    local_replaces "$gomod" "$staging_version"
  } >"$dir/go.mod"

  # What upstream's hack/lib/version.sh stamps in, so that /version and kubectl's
  # version-skew check see the real version instead of v0.0.0-master.
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done

  local t0 out
  for tool in "${want[@]}"; do
    t0=$SECONDS
    out=$(partial_path "$tool")
    (cd "$dir" && "$GO" build "${GO_BUILD_FLAGS[@]}" -ldflags "$ldflags" -o "$out" \
      "$K8S_MODULE/cmd/$tool")
    install_built "$tool" "$out" "$tool $K8S_MODULE $K8S_VERSION"
    report "$tool" "built $K8S_VERSION in $((SECONDS - t0)) s"
  done
}

# ---- helm --------------------------------------------------------------------------
build_helm() {
  local stamp="helm $HELM_MODULE $HELM_VERSION"
  if is_cached helm "$stamp"; then report helm "cached ($HELM_VERSION)"; return; fi
  local start=$SECONDS dir gomod out
  dir=$(new_wrapper helm)
  out=$(partial_path helm)
  gomod=$(go_mod_of "$dir" "$HELM_MODULE@$HELM_VERSION")
  {
    echo "module cqrs-stack/k8s-tools/helm"
    echo "go $(go_directive)"
    echo "require $HELM_MODULE $HELM_VERSION"
    local_replaces "$gomod" "$HELM_VERSION"
  } >"$dir/go.mod"
  # As helm's Makefile does: the default Capabilities.KubeVersion of `helm template`
  # and `helm lint` comes from the client-go version helm is built with (v0.M.N ->
  # 1.M); without it helm falls back to an old default.
  local client_go major minor
  client_go=$(cd "$dir" && "$GO" list -mod=mod -m -f '{{.Version}}' k8s.io/client-go)
  client_go=${client_go#v}
  major=$((${client_go%%.*} + 1))
  minor=${client_go#*.}
  minor=${minor%%.*}
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  local pkg
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
  done
  (cd "$dir" && "$GO" build "${GO_BUILD_FLAGS[@]}" -ldflags "$ldflags" -o "$out" \
    "$HELM_MODULE/cmd/helm")
  install_built helm "$out" "$stamp"
  report helm "built $HELM_VERSION in $((SECONDS - start)) s"
}

# ---- main --------------------------------------------------------------------------
# Sourced (by tests/cluster/build-node-tools.sh): only the functions and pins above.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

ASSETS_OK=0
if [[ -n ${KUBEBUILDER_ASSETS:-} ]]; then
  if [[ -x $KUBEBUILDER_ASSETS/etcd && -x $KUBEBUILDER_ASSETS/kube-apiserver ]]; then
    ASSETS_OK=1
  else
    echo "build-k8s-tools: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks etcd or" \
      "kube-apiserver; building them instead" >&2
  fi
fi

if [[ $ASSETS_OK == 1 ]]; then
  take_from_assets etcd
  take_from_assets kube-apiserver
else
  build_etcd
fi
build_kubernetes
build_helm
