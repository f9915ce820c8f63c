#!/usr/bin/env bash
# Build the wheelhouse the image builds install from (no index inside the build):
#   .cache/wheelhouse/*.whl                        every dependency of
#                                                  `cqrs-stack[operator,tracing]`, plus
#                                                  setuptools/wheel to build the project
#   .cache/wheelhouse/requirements-services.txt    pinned dependencies of the services image,
#                                                  with the tracing extra (TRACING=true works)
#   .cache/wheelhouse/requirements-operator.txt    ... and of the operator image (no tracing)
# Each pin carries its wheel's sha256, which must be one of requirements/test.lock's
# (tests/images/pin_hashes.py).
# The project itself is not in it: the Dockerfiles build it from the sources in the context, so
# a code change rebuilds only the last layers.
#
# Wheels are downloaded on the host (its pip, its index and certificates) and pinned to the
# versions of requirements/test.lock, the ones the tests ran with. The pinned sets are then resolved offline by
# the base image's own pip (`--network none`): environment markers such as
# `python_full_version < "3.11.3"` must be evaluated by the interpreter that installs them, and a
# requirement only it needs is fetched on the host and the resolution repeated.
#
# Needs a reachable Docker engine (DOCKER_HOST) and the base image (BASE_IMAGE).
# Cached: skipped when pyproject.toml, the pins, the base and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
DOCKER="${DOCKER:-docker}"
BASE_IMAGE="${BASE_IMAGE:-cqrs-stack-base:bookworm}"
HOUSE=.cache/wheelhouse
STATE=.cache/wheelhouse-state
mkdir -p "$HOUSE" "$STATE"

base_id="$("$DOCKER" image inspect --format '{{.Id}}' "$BASE_IMAGE")"
# Pins: the lock the tests install from (requirements/test.lock), as name==version.
sed -n 's/^\([A-Za-z0-9._-]*==[^ ;]*\).*/\1/p' requirements/test.lock >"$STATE/constraints.txt"
stamp="$( (cat pyproject.toml "$STATE/constraints.txt" "$0" tests/images/pin_hashes.py
           echo "$base_id") | sha256sum | cut -c1-16)"
if [[ -f "$STATE/stamp" && "$(cat "$STATE/stamp")" == "$stamp" \
      && -f "$HOUSE/requirements-operator.txt" && "${FORCE:-0}" != 1 ]]; then
    echo "wheelhouse: up to date ($stamp)"
    exit 0
fi

host_wheel() {  # host_wheel REQUIREMENT...: add wheels (and their dependencies) to the house
    # The build backend's warnings are noise here; the log is shown when pip fails.
    "$PYTHON" -m pip wheel -q --disable-pip-version-check --find-links "$HOUSE" \
        -c "$STATE/constraints.txt" -w "$HOUSE" "$@" >"$STATE/pip-wheel.log" 2>&1 \
        || { tail -40 "$STATE/pip-wheel.log" >&2; exit 1; }
}

echo "wheelhouse: pip wheel .[operator,tracing] -> $HOUSE"
host_wheel '.[operator,tracing]' 'setuptools>=68' wheel
# The project's wheel serves the resolution below; the images build it from source.
rm -f "$STATE"/cqrs_stack-*.whl
mv "$HOUSE"/cqrs_stack-*.whl "$STATE/"
project_wheel="$(basename "$STATE"/cqrs_stack-*.whl)"

resolve() {  # resolve SPEC OUT: the pinned set SPEC needs, as the base's pip resolves it
    "$DOCKER" run --rm --network none \
        -v "$PWD/$HOUSE:/wheels:ro" -v "$PWD/$STATE/$project_wheel:/tmp/$project_wheel:ro" \
        "$BASE_IMAGE" sh -c '
            python3 -m venv /tmp/venv \
            && /tmp/venv/bin/pip install -q --disable-pip-version-check --dry-run \
                --ignore-installed --no-index --find-links /wheels --report /tmp/report.json "$1" \
            && /tmp/venv/bin/python -c "
import json
metas = [i[\"metadata\"] for i in json.load(open(\"/tmp/report.json\"))[\"install\"]]
pins = (m[\"name\"] + \"==\" + m[\"version\"] for m in metas if m[\"name\"] != \"cqrs-stack\")
print(\"\\n\".join(sorted(pins)))"' resolve "/tmp/$project_wheel$1" >"$2" 2>"$STATE/resolve.log"
}

for image in services operator; do
    # The services trace when TRACING is on; the operator makes no spans.
    extra="[tracing]"
    [[ "$image" == operator ]] && extra="[operator]"
    for _ in 1 2 3 4 5 6 7 8; do
        if resolve "$extra" "$HOUSE/requirements-$image.txt"; then
            continue 2
        fi
        missing="$(sed -n 's/.*No matching distribution found for \([^;]*\).*/\1/p' \
            "$STATE/resolve.log" | head -1)"
        if [[ -z "$missing" ]]; then
            cat "$STATE/resolve.log" >&2
            echo "wheelhouse: the base image's pip cannot resolve $image" >&2
            exit 1
        fi
        echo "wheelhouse: the base's Python also needs $missing"
        host_wheel "$missing"
    done
    echo "wheelhouse: $image still unresolved after 8 rounds" >&2
    exit 1
done
# Each pin gets its wheel's sha256, checked against requirements/test.lock's hashes (the files
# the tests installed): the images' pip installs in hash-checking mode.
"$PYTHON" tests/images/pin_hashes.py requirements/test.lock "$HOUSE" \
    "$HOUSE/requirements-services.txt" "$HOUSE/requirements-operator.txt"
echo "$stamp" >"$STATE/stamp"
echo "wheelhouse: $(ls "$HOUSE"/*.whl | wc -l) wheels," \
    "$(wc -l <"$HOUSE/requirements-services.txt") pinned for services," \
    "$(wc -l <"$HOUSE/requirements-operator.txt") for the operator"
