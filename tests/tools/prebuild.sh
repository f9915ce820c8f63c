#!/usr/bin/env bash
# Build ahead everything the end-to-end stages need, so that CI can do it in the background
# while the unit and integration tests run (`.ci/run`); each stage then finds it cached.
#   images      cqrs-stack / cqrs-stack-operator (tests/images/build-images.sh), the database
#               images and the previous release's (tests/cluster/images.sh --build-only)
#   binaries    the local cluster's (tests/cluster/build-node-tools.sh) and the kind node's
#               (tests/images/kind/build-node-bins.sh), from Go sources
#   node image  the offline kind node image (tests/images/kind/build-node.sh)
# Every step is cached by the script that does it, and image builds take the clone's image
# lock (docker-engine.sh), so running this next to a stage that builds the same is safe.
# Needs the Go tools of build-k8s-tools.sh / build-dev-tools.sh built first (make k8s-tools
# dev-tools) and a Docker engine (docker-engine.sh finds or starts one).
set -euo pipefail
cd "$(dirname "$0")/../.."

step() {  # step NAME COMMAND...: run it, report its time; the first failure ends the script
    local t0=$SECONDS
    echo "prebuild: $1 ..."
    "${@:2}"
    echo "prebuild: $1 done in $((SECONDS - t0)) s"
}
started=$SECONDS
step images bash tests/images/build-images.sh
step "database and previous-release images" bash tests/cluster/images.sh --build-only
step "local cluster binaries" bash tests/cluster/build-node-tools.sh
step "kind node binaries" bash tests/images/kind/build-node-bins.sh
step "kind node image" bash tests/images/kind/build-node.sh
echo "prebuild: all done in $((SECONDS - started)) s"
