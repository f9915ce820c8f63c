# Source this: make a Docker engine reachable, starting a private one if none is.
#
#   source tests/images/docker-engine.sh
#   docker_engine_up      # exports DOCKER_HOST; sets CQRS_DOCKERD_STARTED=1 if it started one
#   docker_engine_down    # stops the engine only if docker_engine_up started it
#   images_lock           # waits until no other build of our images runs (held until exit)
#
# The private engine (Debian's docker.io) listens on unix:///run/cqrs-docker.sock, keeps its
# images in /var/lib/cqrs-docker (so they survive restarts) and creates no bridge and no
# iptables rules: containers use --network host. It never touches a system engine.

CQRS_DOCKER_SOCK="${CQRS_DOCKER_SOCK:-/run/cqrs-docker.sock}"
CQRS_DOCKER_ROOT="${CQRS_DOCKER_ROOT:-/var/lib/cqrs-docker}"
CQRS_DOCKER_RUN="${CQRS_DOCKER_RUN:-/run/cqrs-docker}"
CQRS_DOCKERD_LOG="${CQRS_DOCKERD_LOG:-$CQRS_DOCKER_RUN/dockerd.log}"
DOCKER="${DOCKER:-docker}"

docker_engine_reachable() {
    "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

docker_engine_up() {
    CQRS_DOCKERD_STARTED=0
    if ! command -v "$DOCKER" >/dev/null; then
        echo "docker: no docker client on PATH: apt-get install -y docker.io" >&2
        return 1
    fi
    # An engine the caller points at (DOCKER_HOST) or the default socket: use it.
    if docker_engine_reachable; then
        return 0
    fi
    # Our private engine, maybe left running by an earlier build.
    export DOCKER_HOST="unix://$CQRS_DOCKER_SOCK"
    if docker_engine_reachable; then
        return 0
    fi
    if ! command -v dockerd >/dev/null; then
        echo "docker: no engine is reachable and dockerd is not installed:" \
            "apt-get install -y docker.io" >&2
        return 1
    fi
    if [[ "$(id -u)" != 0 ]]; then
        echo "docker: no engine is reachable and starting dockerd needs root" >&2
        return 1
    fi
    mkdir -p "$CQRS_DOCKER_ROOT" "$CQRS_DOCKER_RUN"
    # runc-bounded: runc that never asks for a capability outside this machine's bounding
    # set, so that privileged containers (kind's nodes) start where root lacks one.
    local runtime
    runtime="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/runc-bounded"
    # A session of its own (setsid): a Ctrl-C to the caller's process group (a dev loop in
    # a terminal) must not stop an engine that outlives the caller. --wait: where setsid
    # must fork (the caller a group leader), $! stays alive as long as dockerd does.
    local detach=()
    if command -v setsid >/dev/null; then detach=(setsid --wait); fi
    "${detach[@]}" dockerd --host "unix://$CQRS_DOCKER_SOCK" --data-root "$CQRS_DOCKER_ROOT" \
        --exec-root "$CQRS_DOCKER_RUN/exec" --pidfile "$CQRS_DOCKER_RUN/dockerd.pid" \
        --iptables=false --ip6tables=false --bridge=none \
        --add-runtime "runc-bounded=$runtime" --default-runtime runc-bounded \
        >"$CQRS_DOCKERD_LOG" 2>&1 &
    local pid=$! waited=0
    while ! docker_engine_reachable; do
        if ! kill -0 "$pid" 2>/dev/null || ((waited >= 60)); then
            echo "docker: dockerd did not start (log $CQRS_DOCKERD_LOG):" >&2
            grep -E 'level=(error|fatal)|failed|Error' "$CQRS_DOCKERD_LOG" | tail -15 >&2 \
                || tail -15 "$CQRS_DOCKERD_LOG" >&2
            kill "$pid" 2>/dev/null || true
            return 1
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
    CQRS_DOCKERD_STARTED=1
    echo "docker: started dockerd (pid $pid) on $DOCKER_HOST"
}

docker_engine_down() {
    [[ "${CQRS_DOCKERD_STARTED:-0}" == 1 ]] || return 0
    local pidfile="$CQRS_DOCKER_RUN/dockerd.pid" pid
    pid="$(cat "$pidfile" 2>/dev/null)" || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    echo "docker: stopped dockerd (pid $pid)"
}

# One image build at a time per engine: CI builds images ahead in the background while the
# image tests build the same ones, two builds of one tag (or of the base) must not race, and
# prune_images must not remove a build's newest step. The private engine is one per machine,
# so its lock is too (beside its pid file); another engine's is the clone's.
# The first caller in a process tree takes the lock on fd 9 and holds it until it exits; its
# children inherit fd 9 and the marker, so a nested build script does not wait for its parent.
images_lock() {
    [[ -n "${CQRS_IMAGES_LOCKED:-}" ]] && return 0
    local dir
    if [[ ${DOCKER_HOST:-} == "unix://$CQRS_DOCKER_SOCK" ]]; then
        dir=$CQRS_DOCKER_RUN
    else
        dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.cache"
    fi
    mkdir -p "$dir"
    exec 9>"$dir/images.lock"
    if ! flock -n 9; then
        echo "images: another build of the images runs on this engine; waiting for it" >&2
        flock 9
        # The build waited for may have stopped the engine it had started, at its exit.
        if ! docker_engine_reachable; then
            docker_engine_up >&2 || return 1  # stdout may be the caller's answer
        fi
    fi
    export CQRS_IMAGES_LOCKED=1
}

# build_staged DOCKERFILE REFERENCE CONTEXT [NAME=VALUE...]: the classic builder (it needs no
# buildx plugin and never resolves the base in a registry) builds a Dockerfile whose build
# stage is `builder`, that stage tagged <repository>-build:<tag> first: untagged it would be
# dangling, prune_images would remove it, and the next build of an unchanged tree would
# install every dependency again instead of using the cache. NAME=VALUE are build arguments.
build_staged() {
    local file=$1 reference=$2 context=$3 arg args=()
    shift 3
    for arg in "$@"; do args+=(--build-arg "$arg"); done
    DOCKER_BUILDKIT=0 "$DOCKER" build -f "$file" --target builder \
        -t "${reference%%:*}-build:${reference##*:}" "${args[@]}" "$context" \
        && DOCKER_BUILDKIT=0 "$DOCKER" build -f "$file" -t "$reference" "${args[@]}" "$context"
}

# Rebuilding a tag leaves the image it replaces dangling, and each `skaffold dev` iteration
# tags new images: after a day of dev loops the engine held 117 images (10.9 GB), all ours.
#   prune_images           dangling images: all of them in the private engine (it holds
#                          only what we built), only ours (by their title label) elsewhere
#   prune_images --dev     also the build steps' containers skaffold dev leaves, and
#                          the dev loop's tags of cqrs-stack and cqrs-stack-operator:
#                          skaffold's <commit>[-dirty], <tag>-<n>-g<commit>[-dirty] (git
#                          describe) and <image ID> (hex) and `latest`; a
#                          release's <version>, <version>-<commit> and any tag of yours are kept
# An image a container still uses is kept (`docker rmi` without -f refuses it). Takes the
# image lock: a build's newest step is dangling until the next step, so no build of ours may
# run; builds that take no lock are covered by the age filter below.
# CQRS_IMAGE_REPOS: the repositories that are ours (default: cqrs-stack cqrs-stack-operator).
prune_images() {
    local repo tag repos
    read -r -a repos <<<"${CQRS_IMAGE_REPOS:-cqrs-stack cqrs-stack-operator}"
    images_lock
    # A cleanup: nothing here may fail its caller (a dev loop's exit, a finished build).
    if [[ ${1:-} == --dev ]]; then
        # `skaffold dev`'s builds leave each step's container behind (`skaffold build`'s do
        # not), and each pins its image: the classic builder's step containers (created or
        # exited, descending from the offline base, running a step's `/bin/sh -c`) go first.
        local id
        for id in $("$DOCKER" ps -aq --filter status=created --filter status=exited \
            --filter "ancestor=${BASE_IMAGE:-cqrs-stack-base:bookworm}" 2>/dev/null || true); do
            [[ "$("$DOCKER" inspect --format '{{join .Config.Cmd " "}}' "$id" 2>/dev/null)" == "/bin/sh -c "* ]] \
                && "$DOCKER" rm "$id" >/dev/null 2>&1
        done
        # Only the tags the dev loop makes: removing by "not a release tag" took a previous
        # release of another version and a user's own tags with them.
        for repo in "${repos[@]}"; do
            for tag in $("$DOCKER" image ls --format '{{.Tag}}' "$repo" 2>/dev/null || true); do
                [[ $tag =~ ^[0-9a-f]{7,64}(-dirty)?$ || $tag =~ ^.+-[0-9]+-g[0-9a-f]{7,40}(-dirty)?$ \
                    || $tag == latest ]] || continue
                "$DOCKER" rmi "$repo:$tag" >/dev/null 2>&1 || true
            done
        done
    fi
    # Only dangling images older than CQRS_PRUNE_AFTER (30m): a build outside the lock (skaffold's
    # own build in `make dev`, a user's docker build) commits each step as a dangling image
    # until the next, and lost one mid-build ("unknown parent image ID"). 0: no age filter
    # (Docker's `until=0s` is cut to whole seconds and misses an image made this second).
    local after=()
    [[ ${CQRS_PRUNE_AFTER:-30m} =~ ^0[smh]?$ ]] || after=(--filter "until=${CQRS_PRUNE_AFTER:-30m}")
    if [[ ${DOCKER_HOST:-} == "unix://$CQRS_DOCKER_SOCK" ]]; then
        "$DOCKER" image prune -f "${after[@]}" >/dev/null 2>&1 || true
    else
        for repo in "${repos[@]}"; do
            "$DOCKER" image prune -f "${after[@]}" \
                --filter "label=org.opencontainers.image.title=$repo" >/dev/null 2>&1 || true
        done
    fi
}
