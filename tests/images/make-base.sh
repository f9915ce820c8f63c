#!/usr/bin/env bash
# Build the offline base image `cqrs-stack-base:bookworm`: a minimal Debian 12 root filesystem
# (debootstrap --variant=minbase) with Debian's Python 3.11, venv and pip and CA certificates,
# security updates applied, imported with `docker import`. No registry is needed, only a Debian
# mirror (DEBIAN_MIRROR, default deb.debian.org).
#
# Cached: skipped when the image exists and carries this script's hash as a label; any change
# to this script rebuilds it. FORCE=1 rebuilds anyway. Needs root and `debootstrap`.
#
# A user with a registry does not need this: pass --build-arg BASE_IMAGE=python:3.11-slim.
set -euo pipefail

IMAGE="${BASE_IMAGE:-cqrs-stack-base:bookworm}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
DOCKER="${DOCKER:-docker}"
HASH_LABEL=dev.cqrs-stack.base.script-sha256

script_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
have="$("$DOCKER" image inspect --format "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$IMAGE" \
    2>/dev/null || true)"
if [[ "$have" == "$script_hash" && "${FORCE:-0}" != 1 ]]; then
    echo "base: $IMAGE is up to date (script $script_hash)"
    exit 0
fi

if [[ "$(id -u)" != 0 ]]; then
    echo "base: debootstrap needs root (run as root, or build with BASE_IMAGE=python:3.11-slim)" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    echo "base: debootstrap is missing: apt-get install -y debootstrap" >&2
    exit 1
fi

started=$SECONDS
rootfs="$(mktemp -d /var/tmp/cqrs-base.XXXXXX)"
chmod 755 "$rootfs"  # it becomes the image's /: every user must traverse it
cleanup() {
    # Interrupted (a Ctrl-C, a stopped CI run): what still runs inside the root filesystem
    # (apt, dpkg, a maintainer script) would hold its /proc mount and outlive this script.
    local p
    for p in /proc/[0-9]*; do
        [[ "$(readlink "$p/root" 2>/dev/null)" == "$rootfs" ]] && kill -KILL "${p#/proc/}" 2>/dev/null
    done
    for m in proc dev/pts dev sys; do umount "$rootfs/$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$rootfs" "$rootfs.log"
}
trap cleanup EXIT

echo "base: debootstrap $SUITE ($PACKAGES) from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
    >"$rootfs.log" 2>&1 || { tail -40 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"

echo "base: security updates"
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
mount -t proc proc "$rootfs/proc"
chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get -q update && apt-get -q -y -o Dpkg::Use-Pty=0 upgrade && apt-get clean' \
    >"$rootfs.log" 2>&1 || { tail -40 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
umount "$rootfs/proc"

echo "base: slimming"
# What a container never reads: package lists, caches, docs, man pages, other locales' messages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/log/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* "$rootfs"/tmp/* "$rootfs"/root/.cache
: >"$rootfs/etc/resolv.conf"
# Docker supplies /dev, /proc and /sys; the image carries none of them.
rm -rf "${rootfs:?}"/dev/* "${rootfs:?}"/proc/* "${rootfs:?}"/sys/*

python_version="$(chroot "$rootfs" /usr/bin/python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
echo "base: importing $IMAGE (python $python_version)"
tar --numeric-owner -C "$rootfs" -c . | "$DOCKER" import \
    --change "LABEL $HASH_LABEL=$script_hash" \
    --change "LABEL org.opencontainers.image.title=cqrs-stack-base" \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase, Python $python_version\"" \
    --change "LABEL org.opencontainers.image.base.name=debian:$SUITE" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
echo "base: $IMAGE built in $((SECONDS - started)) s"
