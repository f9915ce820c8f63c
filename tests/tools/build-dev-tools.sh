#!/usr/bin/env bash
# Build the developer-loop tools, skaffold and kind, from Go sources fetched through the
# Go module proxy, and cache them in $REPO/.cache/bin (next to the tools that
# build-k8s-tools.sh makes). Release binaries cannot be downloaded on our machines.
#
# Each binary gets a stamp file holding its recipe: a second run with unchanged pins
# does nothing, changing a pin rebuilds just that tool.
#
# skaffold's go.mod pins dependencies with `replace` (and `exclude`) lines, which only
# the main module may carry, so `go install skaffold@version` refuses it. As
# build-k8s-tools.sh does for Kubernetes, we build it from a temporary wrapper module
# whose go.mod requires skaffold and repeats upstream's pins.
#
# Environment:
#   DEV_TOOLS_BIN_DIR   output folder (default: K8S_TOOLS_BIN_DIR, else $REPO/.cache/bin).
#   DEV_TOOLS           which tools to build (default: "skaffold kind").
#   GO                  the go command (default: go on PATH, else /usr/local/go/bin/go).
set -euo pipefail

# ---- pinned versions ---------------------------------------------------------------
# v2.16.1 is the newest skaffold release that the module proxy serves (it answers
# 403 "not available" for v2.17.x and v2.18.x).
SKAFFOLD_MODULE=github.com/GoogleContainerTools/skaffold/v2
SKAFFOLD_VERSION=v2.16.1
KIND_MODULE=sigs.k8s.io/kind
KIND_VERSION=v0.33.0

# ---- setup -------------------------------------------------------------------------
# The Go environment, cache folder, stamps and go.mod lookup are build-k8s-tools.sh's
# (sourced: only its functions and pins, none of its builds).
K8S_TOOLS_BIN_DIR=${DEV_TOOLS_BIN_DIR:-${K8S_TOOLS_BIN_DIR:-}}
[[ -n $K8S_TOOLS_BIN_DIR ]] || unset K8S_TOOLS_BIN_DIR
# shellcheck source=build-k8s-tools.sh
source "$(dirname "${BASH_SOURCE[0]}")/build-k8s-tools.sh"
TOOLS=${DEV_TOOLS:-skaffold kind}

# upstream_pins GOMOD: upstream's replace and exclude directives (single lines and
# blocks), as single lines; replaces into local paths are dropped (they point into
# upstream's own tree and cannot resolve here).
upstream_pins() {
  awk '
    /^(replace|exclude)[[:space:]]*\($/ { block = $1; next }
    block && /^\)/                      { block = ""; next }
    {
      line = $0; sub(/\/\/.*/, "", line)
      if (block) { kind = block }
      else if (line ~ /^(replace|exclude)[[:space:]]/) { kind = $1; sub(/^[a-z]+[[:space:]]+/, "", line) }
      else next
      if (line ~ /^[[:space:]]*$/) next
      if (kind == "replace" && line ~ /=>[[:space:]]*\.\.?\//) next
      print kind, line
    }' "$1"
}

# ---- skaffold ----------------------------------------------------------------------
build_skaffold() {
  local stamp="skaffold $SKAFFOLD_MODULE $SKAFFOLD_VERSION"
  if is_cached skaffold "$stamp"; then report skaffold "cached ($SKAFFOLD_VERSION)"; return; fi
  local start=$SECONDS dir gomod out
  dir=$SCRATCH/skaffold
  mkdir "$dir"
  out=$(partial_path skaffold)
  gomod=$(go_mod_of "$dir" "$SKAFFOLD_MODULE@$SKAFFOLD_VERSION")
  {
    echo "module cqrs-stack/dev-tools/skaffold"
    echo "go $(go_directive)"
    echo "require $SKAFFOLD_MODULE $SKAFFOLD_VERSION"
    upstream_pins "$gomod"
  } >"$dir/go.mod"
  # What skaffold's Makefile stamps in; `skaffold version` and the schema upgrade
  # checks read it.
  local ldflags="-s -w -X $SKAFFOLD_MODULE/pkg/skaffold/version.version=$SKAFFOLD_VERSION"
  (cd "$dir" && "$GO" build "${GO_BUILD_FLAGS[@]}" -ldflags "$ldflags" -o "$out" \
    "$SKAFFOLD_MODULE/cmd/skaffold")
  install_built skaffold "$out" "$stamp"
  report skaffold "built $SKAFFOLD_VERSION in $((SECONDS - start)) s"
}

# ---- kind --------------------------------------------------------------------------
build_kind() {
  local stamp="kind $KIND_MODULE $KIND_VERSION"
  if is_cached kind "$stamp"; then report kind "cached ($KIND_VERSION)"; return; fi
  local start=$SECONDS out
  out=$(partial_path kind)
  # kind's go.mod has no replace lines: plain `go install` works. It installs into a
  # scratch GOBIN; the copy next to the target makes the final rename atomic.
  GOBIN=$SCRATCH/kind-bin "$GO" install -trimpath -ldflags "-s -w" \
    "$KIND_MODULE@$KIND_VERSION"
  cp "$SCRATCH/kind-bin/kind" "$out"
  install_built kind "$out" "$stamp"
  report kind "built $KIND_VERSION in $((SECONDS - start)) s"
}

# ---- main --------------------------------------------------------------------------
for tool in $TOOLS; do
  case $tool in
    skaffold) build_skaffold ;;
    kind) build_kind ;;
    *) echo "build-dev-tools: unknown tool '$tool' (known: skaffold kind)" >&2; exit 2 ;;
  esac
done
