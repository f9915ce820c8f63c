#!/usr/bin/env bash
# Build a kind node image offline: `kind build node-image` itself, fed with what is built
# here instead of what it would download.
#
#   base   cqrs-kind-base:bookworm   node-base.Dockerfile: the offline Debian base (make-base.sh)
#          + systemd, containerd, runc, CNI plugins from Debian + kind's own base files + crictl
#   bits   a release tarball laid out as kubernetes-server-linux-amd64.tar.gz: kubeadm, kubelet,
#          kubectl (Go sources, .cache/bin) and image archives of every image the node preloads
#   node   kind build node-image --type file <tarball> --base-image cqrs-kind-base:bookworm
#
# The images are tagged as kubeadm (`kubeadm config images list`) and kind's manifests ask for
# them, so nothing is pulled: kind skips pulling an image the tarball carries. Each is a static
# binary from Go sources (C for pause) on an empty image, or on the offline base where it needs
# a userland (kube-proxy: iptables; local-path-helper: sh). Versions are ours, not the tags'
# (etcd v3.6.16 under kubeadm's 3.6.5-0 tag, CoreDNS v1.14.7 under v1.12.1): the label
# org.opencontainers.image.version of each image says what it really is.
#
# Cached: the node image carries a hash of its inputs (these files, the binaries' stamps, the
# base's script) as a label; same hash, nothing is rebuilt. FORCE=1 rebuilds.
# Output: the image name on the last line of stdout. Needs root, Docker, debootstrap.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
HERE=$REPO/tests/images/kind
cd "$REPO"
source tests/images/docker-engine.sh
export PATH=$REPO/.cache/bin:$PATH

NODE_IMAGE=${KIND_OFFLINE_NODE_IMAGE:-cqrs-kind-node:v1.34.4}
NODE_BASE=cqrs-kind-base:bookworm
STATE=$REPO/.cache/kind-node
HASH_LABEL=dev.cqrs-stack.kind-node.inputs-sha256
BIN=$REPO/.cache/bin
# The tags kind v0.33.0 and kubeadm v1.34 ask for (pkg/build/nodeimage/const_*.go, kind's
# containerd config sandbox_image, kubeadm's constants).
K8S_VERSION=v1.34.4
ETCD_TAG=3.6.5-0
COREDNS_TAG=v1.12.1
PAUSE_TAG=3.10
KINDNETD_TAG=v20260820-69b56db7
LPP_TAG=v20260820-69b56db7
LPH_TAG=v20260131-7181c60a

say() { echo "kind-node: $*" >&2; }

# quiet_build ARGS...: the classic builder (no buildx, never resolves FROM in a registry),
# --network host for apt-get; its output only when it fails.
quiet_build() {
  local log=$STATE/build.log
  DOCKER_BUILDKIT=0 docker build -q --network host "$@" >"$log" 2>&1 \
    || { tail -30 "$log" >&2; say "docker build $* failed"; exit 1; }
}
started=$SECONDS

docker_engine_up || { say "no Docker engine"; exit 1; }
# `kind build node-image` builds in a container of its own (kind-build-<time>-<n>) and leaves
# it behind when interrupted: removed here, with the engine stopped if this script started it.
# One node build at a time per engine (images_lock below): once it holds the lock, a new
# kind-build container is ours.
kind_builds_before=
cleanup() {
  local id
  [[ -n $kind_builds_before ]] && for id in $(comm -13 <(echo "${kind_builds_before#ids: }") <(docker ps -aq --filter name=kind-build- 2>/dev/null | sort)); do
    docker rm -f "$id" >/dev/null 2>&1 || true
  done
  docker_engine_down
}
trap cleanup EXIT

# ---- binaries (all cached by their stamps) ----------------------------------------------
nice -n 10 bash tests/tools/build-k8s-tools.sh >&2
nice -n 10 bash tests/cluster/build-node-tools.sh >&2
nice -n 10 bash "$HERE/build-node-bins.sh" >&2

# Shares the offline base with the services' images: one image build at a time.
images_lock
kind_builds_before="ids: $(docker ps -aq --filter name=kind-build- 2>/dev/null | sort)"
inputs=$( (cat "$HERE"/*.sh "$HERE"/*.Dockerfile tests/images/make-base.sh "$BIN"/.*.stamp) | sha256sum | cut -c1-16)
have=$(docker image inspect --format "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$NODE_IMAGE" 2>/dev/null || true)
# The image this build replaces (1.3 GB): removed once the new one has its name.
replaced=$(docker image inspect --format '{{.Id}}' "$NODE_IMAGE" 2>/dev/null || true)
if [[ $have == "$inputs" && ${FORCE:-0} != 1 ]]; then
  say "$NODE_IMAGE is up to date ($inputs)"
  echo "$NODE_IMAGE"
  exit 0
fi

rm -rf "$STATE"
mkdir -p "$STATE"

# ---- the base ------------------------------------------------------------------------
bash tests/images/make-base.sh >&2
kind_src=$(cd "$STATE" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kind@$(kind version | awk '{print $2}')" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[[ -d $kind_src/images/base/files ]] || { say "kind's sources not found ($kind_src)"; exit 1; }
mkdir -p "$STATE/base"
cp -r "$kind_src/images/base/files" "$STATE/base/files"
chmod -R u+w "$STATE/base/files"
cp "$BIN/crictl" "$STATE/base/crictl"
t0=$SECONDS
quiet_build -f "$HERE/node-base.Dockerfile" -t "$NODE_BASE" "$STATE/base"
say "$NODE_BASE built in $((SECONDS - t0)) s"

# ---- the images the node preloads ------------------------------------------------------
image() {  # image TAG VERSION FROM BINARY... -- ENTRYPOINT-JSON: build one component image
  local tag=$1 version=$2 from=$3 dir
  shift 3
  dir=$STATE/img/${tag//[\/:]/_}
  mkdir -p "$dir"
  local copies=""
  while [[ $1 != -- ]]; do cp "$1" "$dir/"; copies+="COPY $(basename "$1") /usr/local/bin/"$'\n'; shift; done
  shift
  {
    echo "FROM $from"
    [[ $from == scratch ]] && echo "ENV PATH=/usr/local/bin:/usr/bin:/bin"
    printf '%s' "$copies"
    [[ -n ${EXTRA_RUN:-} ]] && echo "RUN $EXTRA_RUN"
    echo "LABEL org.opencontainers.image.version=\"$version\""
    echo "ENTRYPOINT $1"
  } >"$dir/Dockerfile"
  quiet_build -t "$tag" "$dir"
  say "image $tag ($version)"
}

# pause: the smallest static C program that sleeps until signalled, as upstream's pause.c.
mkdir -p "$STATE/pause"
cat >"$STATE/pause/pause.c" <<'C'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void sigdown(int signo) { (void)signo; exit(0); }
static void sigreap(int signo) { (void)signo; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction down = {.sa_handler = sigdown}, reap = {.sa_handler = sigreap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGINT, &down, NULL);
  sigaction(SIGTERM, &down, NULL);
  sigaction(SIGCHLD, &reap, NULL);
  for (;;) pause();
}
C
gcc -Os -static -o "$STATE/pause/pause" "$STATE/pause/pause.c"
strip "$STATE/pause/pause" || true

k8s=registry.k8s.io
image "$k8s/kube-apiserver:$K8S_VERSION" "$K8S_VERSION" scratch "$BIN/kube-apiserver" -- '["/usr/local/bin/kube-apiserver"]'
image "$k8s/kube-controller-manager:$K8S_VERSION" "$K8S_VERSION" scratch "$BIN/kube-controller-manager" -- '["/usr/local/bin/kube-controller-manager"]'
image "$k8s/kube-scheduler:$K8S_VERSION" "$K8S_VERSION" scratch "$BIN/kube-scheduler" -- '["/usr/local/bin/kube-scheduler"]'
EXTRA_RUN="apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iptables conntrack ipset kmod >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*" \
  image "$k8s/kube-proxy:$K8S_VERSION" "$K8S_VERSION" cqrs-stack-base:bookworm "$BIN/kube-proxy" -- '["/usr/local/bin/kube-proxy"]'
image "$k8s/etcd:$ETCD_TAG" "$(sed 's/.* //' "$BIN/.etcd.stamp")" scratch "$BIN/etcd" -- '["/usr/local/bin/etcd"]'
image "$k8s/coredns/coredns:$COREDNS_TAG" "$(sed 's/.* //' "$BIN/.coredns.stamp")" scratch "$BIN/coredns" -- '["/usr/local/bin/coredns"]'
image "$k8s/pause:$PAUSE_TAG" "$PAUSE_TAG" scratch "$STATE/pause/pause" -- '["/usr/local/bin/pause"]'
EXTRA_RUN="apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iptables >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*" \
  image "docker.io/kindest/kindnetd:$KINDNETD_TAG" "kind $(cat "$HERE/kindnetd/SOURCE")" cqrs-stack-base:bookworm "$BIN/kindnetd" -- '["/usr/local/bin/kindnetd"]'
image "docker.io/kindest/local-path-provisioner:$LPP_TAG" "$(sed 's/.* //' "$BIN/.local-path-provisioner.stamp")" scratch "$BIN/local-path-provisioner" -- '["/usr/local/bin/local-path-provisioner"]'
# The helper pod runs `sh -c` with mkdir/rm/chmod: the offline base has them.
image "docker.io/kindest/local-path-helper:$LPH_TAG" bookworm cqrs-stack-base:bookworm -- '["/bin/sh"]'

# ---- the release tarball and kind build node-image -------------------------------------
bin=$STATE/tarball/kubernetes/server/bin
mkdir -p "$bin"
echo "$K8S_VERSION" >"$STATE/tarball/kubernetes/version"
cp "$BIN/kubeadm" "$BIN/kubelet" "$BIN/kubectl" "$bin/"
for component in kube-apiserver kube-controller-manager kube-scheduler; do
  docker save "$k8s/$component:$K8S_VERSION" -o "$bin/$component.tar"
done
# kind loads every image of these archives and pulls only what none of them carries: the
# images kind itself adds (etcd, CoreDNS, pause, kindnetd, local-path-*) ride with kube-proxy.
docker save -o "$bin/kube-proxy.tar" "$k8s/kube-proxy:$K8S_VERSION" "$k8s/etcd:$ETCD_TAG" \
  "$k8s/coredns/coredns:$COREDNS_TAG" "$k8s/pause:$PAUSE_TAG" \
  "docker.io/kindest/kindnetd:$KINDNETD_TAG" "docker.io/kindest/local-path-provisioner:$LPP_TAG" \
  "docker.io/kindest/local-path-helper:$LPH_TAG"
# kind reads an archive's tags from its first metadata entry: of manifest.json only the first
# image, of `repositories` all of them. So `repositories` goes first, with docker.io/ spelled
# out as kind's manifests spell it (Docker writes kindest/kindnetd for docker.io/kindest/...).
python3 - "$bin/kube-proxy.tar" <<'PY'
import io, json, sys, tarfile
path = sys.argv[1]
with tarfile.open(path) as src:
    members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
out = io.BytesIO()
with tarfile.open(fileobj=out, mode="w") as dst:
    for m, data in sorted(members, key=lambda item: item[0].name != "repositories"):
        if m.name == "repositories":
            repos = json.loads(data)
            data = json.dumps({(r if "." in r.split("/")[0] else f"docker.io/{r}"): t for r, t in repos.items()}).encode()
            m.size = len(data)
        dst.addfile(m, io.BytesIO(data) if data is not None else None)
with open(path, "wb") as f:
    f.write(out.getvalue())
PY
tar -C "$STATE/tarball" -czf "$STATE/kubernetes-server-linux-amd64.tar.gz" kubernetes
rm -rf "$STATE/tarball" "$STATE/img"

t0=$SECONDS
kind build node-image --type file "$STATE/kubernetes-server-linux-amd64.tar.gz" \
  --base-image "$NODE_BASE" --image "$NODE_IMAGE.build" >&2
# The inputs' hash as a label: the cache key of the next run.
echo "FROM $NODE_IMAGE.build" | quiet_build --label "$HASH_LABEL=$inputs" -t "$NODE_IMAGE" -
docker rmi "$NODE_IMAGE.build" >/dev/null
[[ -z $replaced ]] || docker rmi "$replaced" >/dev/null 2>&1 || true
prune_images
rm -f "$STATE/kubernetes-server-linux-amd64.tar.gz"
say "$NODE_IMAGE built in $((SECONDS - t0)) s (all of it: $((SECONDS - started)) s)"
echo "$NODE_IMAGE"
