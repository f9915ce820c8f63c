#!/usr/bin/env bash
# Build the images the chart runs on the local cluster and import them into its containerd
# (namespace k8s.io), where the kubelet finds them: nothing is ever pulled.
#   cqrs-stack:VERSION, cqrs-stack-operator:VERSION  tests/images/build-images.sh (offline base)
#   cqrs-stack:<v>-<commit>, cqrs-stack-operator:...  the previous release (CQRS_PREVIOUS_REF,
#       tests/cluster/previous-release.sh), for the upgrade test
#   cqrs-stack-postgresql:15, cqrs-stack-redis:7      tests/cluster/images/*.Dockerfile: the
#       offline base plus Debian's postgresql-15 / redis-server, with the interface of the
#       official images that the chart assumes (values-local.yaml selects them)
# Uses the Docker engine that tests/images/docker-engine.sh finds or starts (stopped again).
# --build-only: build them all, import nothing (CI builds ahead while other stages run).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/images/docker-engine.sh
# shellcheck source=previous-release.env
source tests/cluster/previous-release.env

SOCK=${CQRS_CONTAINERD_SOCK:-/run/cqrs-cluster/containerd/containerd.sock}
base=${BASE_IMAGE:-cqrs-stack-base:bookworm}
version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
images=("cqrs-stack:$version" "cqrs-stack-operator:$version" cqrs-stack-postgresql:15 cqrs-stack-redis:7)
started=$SECONDS

import=1
[[ ${1:-} == --build-only ]] && import=0
if ((import)); then
    [[ -S $SOCK ]] || { echo "images: no containerd at $SOCK: run tests/cluster/cluster.sh up first" >&2; exit 1; }
fi
docker_engine_up || { echo "images: no Docker engine, cannot build" >&2; exit 1; }
trap docker_engine_down EXIT
images_lock

# The base and our two images (cached by the engine and by make-base's script hash).
KEEP_DOCKERD=1 bash tests/images/build-images.sh

DOCKER="$DOCKER" bash tests/cluster/db-images.sh
# The previous release's images, for the upgrade test (CQRS_PREVIOUS_REF; empty: none).
if [[ -n ${CQRS_PREVIOUS_REF:-} ]]; then
    previous=$(DOCKER="$DOCKER" bash tests/cluster/previous-release.sh)
    images+=("cqrs-stack:$previous" "cqrs-stack-operator:$previous")
    echo "$previous" >.cache/previous-release.tag
fi

if ((!import)); then
    echo "images: ${images[*]} built in $((SECONDS - started)) s (not imported: --build-only)"
    exit 0
fi
t0=$SECONDS
"$DOCKER" save "${images[@]}" \
    | timeout 600 ctr --address "$SOCK" -n k8s.io images import - >/dev/null
echo "images: ${images[*]} imported into the cluster's containerd in $((SECONDS - t0)) s"
echo "images: done in $((SECONDS - started)) s"
