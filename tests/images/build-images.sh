#!/usr/bin/env bash
# Build both images offline: the base (cached), the wheelhouse (cached), then
#   cqrs-stack:<version>           from services/Dockerfile
#   cqrs-stack-operator:<version>  from operator/Dockerfile
# with <version> read from pyproject.toml. Uses a reachable Docker engine or starts a private
# one (tests/images/docker-engine.sh) and stops it again, unless KEEP_DOCKERD=1.
#
# BASE_IMAGE=python:3.11-slim skips the offline base (for machines with a registry).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/images/docker-engine.sh

started=$SECONDS
version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
base="${BASE_IMAGE:-cqrs-stack-base:bookworm}"

docker_engine_up || { echo "images: no Docker engine, cannot build" >&2; exit 1; }
[[ "${KEEP_DOCKERD:-0}" == 1 ]] || trap docker_engine_down EXIT
images_lock

if [[ "$base" == cqrs-stack-base:* ]]; then
    BASE_IMAGE="$base" bash tests/images/make-base.sh
fi
bash tests/images/make-wheelhouse.sh

build() {  # build <dockerfile> <tag>
    local t0=$SECONDS
    echo "images: building $2"
    local log=".cache/build-${2%%:*}.log"
    build_staged "$1" "$2" . BASE_IMAGE="$base" VERSION="$version" REVISION="$revision" >"$log" 2>&1 \
        || { tail -40 "$log" >&2; echo "images: building $2 failed (log $log)" >&2; exit 1; }
    echo "images: $2 built in $((SECONDS - t0)) s," \
        "$("$DOCKER" image inspect --format '{{.Size}}' "$2" | awk '{printf "%.0f MB", $1/1e6}')"
}
build services/Dockerfile "cqrs-stack:$version"
build operator/Dockerfile "cqrs-stack-operator:$version"
prune_images
echo "images: done in $((SECONDS - started)) s"
if [[ "${CQRS_DOCKERD_STARTED:-0}" == 1 && "${KEEP_DOCKERD:-0}" == 1 ]]; then
    echo "images: dockerd keeps running: export DOCKER_HOST=$DOCKER_HOST"
fi
