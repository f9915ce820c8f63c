#!/usr/bin/env bash
# skaffold's custom build for the local cluster (profile `local` of skaffold.yaml): build
# $IMAGE with the offline base, as tests/images/build-images.sh does, then import it into the
# local cluster's containerd (tests/cluster), where the kubelet finds it: no registry.
#
# skaffold sets IMAGE (e.g. cqrs-stack:abc123) and BUILD_CONTEXT. With `local.push: false`
# skaffold then deploys the reference <repository>:<image ID without "sha256:">, which it
# tags in Docker itself after this script (TagWithImageID); the import below carries that
# name too, so the reference the chart gets exists in containerd when the pods start.
#
# Environment: BASE_IMAGE (default the offline base), CQRS_CONTAINERD_SOCK (the local
# cluster's containerd), DOCKER_HOST (skaffold's engine: the one docker-engine.sh started).
set -euo pipefail
cd "${BUILD_CONTEXT:-$(dirname "$0")/../..}"

: "${IMAGE:?skaffold sets IMAGE}"
SOCK=${CQRS_CONTAINERD_SOCK:-/run/cqrs-cluster/containerd/containerd.sock}
base=${BASE_IMAGE:-cqrs-stack-base:bookworm}
repository=${IMAGE%:*}
case ${repository##*/} in
    cqrs-stack) dockerfile=services/Dockerfile ;;
    cqrs-stack-operator) dockerfile=operator/Dockerfile ;;
    *) echo "skaffold-build: no Dockerfile for $IMAGE" >&2; exit 2 ;;
esac
[[ -S $SOCK ]] || { echo "skaffold-build: no containerd at $SOCK (make cluster-up)" >&2; exit 1; }

# One image build at a time per engine (docker-engine.sh): never beside a prune or a build
# of the same base.
source tests/images/docker-engine.sh
images_lock
# The base and the wheelhouse: cached, so a rebuild after an edit only runs the image build.
if [[ $base == cqrs-stack-base:* ]]; then BASE_IMAGE=$base bash tests/images/make-base.sh; fi
bash tests/images/make-wheelhouse.sh
version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
DOCKER_BUILDKIT=0 docker build -q -f "$dockerfile" -t "$IMAGE" \
    --build-arg BASE_IMAGE="$base" --build-arg VERSION="$version" --build-arg REVISION=dev .

id=$(docker image inspect --format '{{.Id}}' "$IMAGE")
unique=$repository:${id#sha256:}
docker tag "$IMAGE" "$unique"
t0=$SECONDS
docker save "$IMAGE" "$unique" | timeout 600 ctr --address "$SOCK" -n k8s.io images import - >/dev/null
echo "skaffold-build: $unique imported into the local cluster's containerd in $((SECONDS - t0)) s"
