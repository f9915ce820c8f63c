#!/usr/bin/env bash
# The previous release for the upgrade test (tests/e2e/test_e2e_upgrade.py): a git worktree of
# CQRS_PREVIOUS_REF in .cache/previous-release (its chart is installed first) and its images
# cqrs-stack:<version>-<commit>, cqrs-stack-operator:<version>-<commit>, built with the
# engine, offline base and wheelhouse that images.sh prepared for this tree (same pinned
# dependencies assumed; if they differ, run tests/images/make-wheelhouse.sh in that tree).
# Prints the tag. Cached: the engine reuses every layer of an unchanged tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/images/docker-engine.sh
images_lock  # one image build at a time per engine (held already when images.sh calls it)
ref=${CQRS_PREVIOUS_REF:?set CQRS_PREVIOUS_REF to the previous release (a tag or commit)}
tree=.cache/previous-release
base=${BASE_IMAGE:-cqrs-stack-base:bookworm}
commit=$(git rev-parse --short "$ref^{commit}")
if [[ "$(git -C "$tree" rev-parse --short HEAD 2>/dev/null)" != "$commit" ]]; then
    git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
    git worktree prune
    git worktree add --detach "$tree" "$commit" >/dev/null 2>&1
fi
rm -rf "$tree/.cache/wheelhouse" && mkdir -p "$tree/.cache"
cp -al .cache/wheelhouse "$tree/.cache/wheelhouse"  # hard links: the build context copies it
version="$(python3 -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$tree/pyproject.toml")"
tag="$version-$commit"
for image in services:cqrs-stack operator:cqrs-stack-operator; do
    t0=$SECONDS log=.cache/build-previous-${image#*:}.log
    build_staged "$tree/${image%%:*}/Dockerfile" "${image#*:}:$tag" "$tree" \
        BASE_IMAGE="$base" VERSION="$version" REVISION="$commit" >"$log" 2>&1 \
        || { tail -40 "$log" >&2; echo "previous-release: building ${image#*:}:$tag failed" >&2; exit 1; }
    echo "previous-release: ${image#*:}:$tag built in $((SECONDS - t0)) s" >&2
done
echo "$tag"
