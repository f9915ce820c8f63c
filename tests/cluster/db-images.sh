#!/usr/bin/env bash
# Build the dev databases' images on the offline base: cqrs-stack-postgresql:15 and
# cqrs-stack-redis:7 (tests/cluster/images/*.Dockerfile: Debian's postgresql-15 and
# redis-server with the interface of the official images that the chart assumes;
# values-local.yaml selects them). Used by the local cluster (images.sh) and by kind's
# offline node (tests/e2e/kind.sh). Needs a reachable Docker engine (DOCKER_HOST).
set -euo pipefail
cd "$(dirname "$0")/../.."
DOCKER=${DOCKER:-docker}
source tests/images/docker-engine.sh
images_lock  # one image build at a time per engine
base=${BASE_IMAGE:-cqrs-stack-base:bookworm}
"$DOCKER" image inspect "$base" >/dev/null 2>&1 || BASE_IMAGE=$base bash tests/images/make-base.sh >&2
mkdir -p .cache
for which in postgresql:15 redis:7; do
    t0=$SECONDS log=.cache/build-cqrs-stack-${which%%:*}.log
    # --network host: apt-get reaches the Debian mirror (the private engine has no bridge).
    DOCKER_BUILDKIT=0 "$DOCKER" build --network host -f "tests/cluster/images/${which%%:*}.Dockerfile" \
        -t "cqrs-stack-$which" --build-arg BASE_IMAGE="$base" tests/cluster/images >"$log" 2>&1 \
        || { tail -40 "$log" >&2; echo "images: building cqrs-stack-$which failed (log $log)" >&2; exit 1; }
    echo "images: cqrs-stack-$which built in $((SECONDS - t0)) s" >&2
done
