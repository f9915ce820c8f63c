"""A real single-node Kubernetes cluster on this machine, offline, as host processes.

    python -m tests.cluster.local_cluster up|down|status

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
(iptables) and CoreDNS run as host processes; pods run in Debian's containerd + runc on
Debian's CNI plugins (bridge + host-local + portmap + loopback). Nothing is pulled: the
pause image is a static binary built here, packed as an OCI image and imported
(``tests/cluster/images.sh`` imports our images and the dev databases' ones).

Addresses, all private and only on this machine: the node is the gateway of the pod bridge
``cqrs0`` (10.213.0.1; pods 10.213.0.0/24); Services are 10.214.0.0/24; the API server
listens on 10.213.0.1:6443; CoreDNS answers ``cluster.local`` on 10.213.0.1:53; etcd is on
loopback. Packets never leave the machine: pods have no masquerade to the outside.

The PKI and kubeconfig writing are the test control plane's (tests/fixtures/control_plane):
its admin identity (group system:masters) is also the identity of the control-plane
components and the kubelet; pods use ServiceAccount tokens under the chart's RBAC.

State lives in /var/lib/cqrs-cluster (CQRS_CLUSTER_DIR); ``down`` stops every process it
started (by pid), removes the pods' containers, mounts, network namespaces, the bridge
and the iptables chains Kubernetes made, and restores the sysctls it changed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

from tests.fixtures.control_plane import (
    REPO_ROOT,
    ControlPlaneError,
    KubeClient,
    _apiserver_args,
    _etcd_args,
    generate_pki,
    wait_for,
    write_kubeconfig,
)

STATE = Path(os.environ.get("CQRS_CLUSTER_DIR", "/var/lib/cqrs-cluster"))
RUN = Path("/run/cqrs-cluster")
BIN = REPO_ROOT / ".cache" / "bin"
KUBECONFIG = STATE / "admin.kubeconfig"
LOGS = REPO_ROOT / ".cache" / "cluster" / "logs"  # kept after down, for post-mortems
CNI_BIN = Path(os.environ.get("CNI_BIN_DIR", "/usr/lib/cni"))

BRIDGE = "cqrs0"
NODE_IP = "10.213.0.1"
POD_CIDR = "10.213.0.0/24"
SERVICE_CIDR = "10.214.0.0/24"
NODE_NAME = "cqrs-local"
API_PORT = 6443
ETCD_PORTS = (12379, 12380)  # below the ephemeral range: no test grabs them by chance
COREDNS_READY = "127.0.0.1:18181"
CONTAINERD_SOCK = RUN / "containerd" / "containerd.sock"
PAUSE_IMAGE = "docker.io/library/cqrs-stack-pause:3.10"
# Changed on up, restored on down: bridged pod-to-pod traffic must pass iptables so that
# Service NAT works between pods on the same bridge.
SYSCTLS = {
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/ipv4/ip_forward": "1",
}
ORDER = [
    "etcd",
    "kube-apiserver",
    "containerd",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "coredns",
]
NEEDED_BINARIES = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "coredns",
    "kubectl",
]


class ClusterUpError(RuntimeError):
    """A step of ``up`` failed or did not finish in time; the message says which and why."""


def log(message: str) -> None:
    print(f"cluster: {message}", flush=True)


def run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise ClusterUpError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from err
    if check and done.returncode != 0:
        raise ClusterUpError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


# ------------------------------------------------------------------------ processes


def pidfile(name: str) -> Path:
    return RUN / f"{name}.pid"


def running_pid(name: str) -> int | None:
    """The pid of our ``name`` if that process still runs the binary we started."""
    try:
        pid = int(pidfile(name).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(cmdline).name == name else None


def start(name: str, argv: list[str]) -> None:
    if running_pid(name):
        log(f"{name} already running (pid {running_pid(name)})")
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{name}.log").open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this script; `down` stops it by pid
            close_fds=True,
        )
    pidfile(name).write_text(f"{proc.pid}\n")
    # Until the child has exec'd, /proc/<pid>/cmdline is still Python's.
    deadline = time.monotonic() + 5
    while not running_pid(name) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    log(f"{name} started (pid {proc.pid}, log {LOGS / f'{name}.log'})")


def log_tail(name: str, lines: int = 25) -> str:
    try:
        text = (LOGS / f"{name}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def died(name: str):
    def check() -> str | None:
        if running_pid(name):
            return None
        return f"{name} exited; log tail ({LOGS / f'{name}.log'}):\n{log_tail(name)}"

    return check


def wait(what: str, condition, timeout: float, name: str) -> None:
    try:
        wait_for(condition, timeout=timeout, interval=0.5, what=what, abort=died(name))
    except ControlPlaneError as err:
        raise ClusterUpError(f"{err}\n--- {name} log tail:\n{log_tail(name)}") from None


def stop(name: str, timeout: float = 20) -> None:
    pid = running_pid(name)
    if pid is None:
        pidfile(name).unlink(missing_ok=True)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_pid(name) and time.monotonic() < deadline:
        time.sleep(0.2)
    if running_pid(name):
        os.kill(pid, signal.SIGKILL)
        log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f} s: killed")
    pidfile(name).unlink(missing_ok=True)
    log(f"{name} stopped")


def write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on change: kube-proxy exits when its config file is written to."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# ---------------------------------------------------------------------------- pieces


def preflight() -> None:
    if os.geteuid() != 0:
        raise ClusterUpError("the local cluster needs root (containerd, kubelet, iptables)")
    missing = [b for b in NEEDED_BINARIES if not os.access(BIN / b, os.X_OK)]
    if missing:
        raise ClusterUpError(
            f"not built: {', '.join(missing)} in {BIN}: run `make k8s-tools` and "
            "`bash tests/cluster/build-node-tools.sh` (cluster.sh up does both)"
        )
    for tool in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip"):
        if shutil.which(tool) is None:
            raise ClusterUpError(f"{tool} is not installed: apt-get install -y containerd runc")
    for plugin in ("bridge", "host-local", "portmap", "loopback"):
        if not (CNI_BIN / plugin).exists():
            raise ClusterUpError(
                f"CNI plugin {plugin} not in {CNI_BIN}: "
                "apt-get install -y containernetworking-plugins"
            )


def network_up() -> None:
    if run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        log(f"bridge {BRIDGE} created")
    addrs = run("ip", "-o", "-4", "addr", "show", "dev", BRIDGE).stdout
    if f"{NODE_IP}/" not in addrs:
        run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    saved = STATE / "sysctl-before.json"
    if not saved.exists():
        before = {key: Path(f"/proc/sys/{key}").read_text().strip() for key in SYSCTLS}
        saved.write_text(json.dumps(before))
    for key, value in SYSCTLS.items():
        Path(f"/proc/sys/{key}").write_text(value)


def pki_and_kubeconfig():
    pki_dir = STATE / "pki"
    if not (pki_dir / "sa.pub").exists():
        generate_pki(pki_dir)
        log("PKI generated")
    from tests.fixtures.control_plane import Pki

    return Pki(
        client_ca_cert=pki_dir / "client-ca.crt",
        admin_cert=pki_dir / "admin.crt",
        admin_key=pki_dir / "admin.key",
        service_account_key=pki_dir / "sa.key",
        service_account_pub=pki_dir / "sa.pub",
    )


def set_flag(args: list[str], flag: str, value: str | None) -> list[str]:
    """``args`` without ``--flag=...``, plus ``--flag=value`` unless value is None."""
    kept = [a for a in args if not a.startswith(f"--{flag}=")]
    return kept if value is None else [*kept, f"--{flag}={value}"]


def start_etcd() -> None:
    args = _etcd_args(BIN / "etcd", STATE / "etcd", *ETCD_PORTS)
    start("etcd", args)
    wait(
        "etcd /health",
        lambda: http_ok(f"http://127.0.0.1:{ETCD_PORTS[0]}/health", b'"true"'),
        60,
        "etcd",
    )


def start_apiserver(pki) -> Path:
    cert_dir = STATE / "apiserver-serving"
    args = _apiserver_args(BIN / "kube-apiserver", pki, cert_dir, ETCD_PORTS[0], API_PORT)
    # The test control plane serves loopback only and runs no pods; a node with pods needs
    # the API reachable from them (the `kubernetes` Service's endpoint is the node IP), the
    # ServiceAccount admission (token volumes), and the API server reaching the kubelet.
    for flag, value in {
        "bind-address": NODE_IP,
        "advertise-address": NODE_IP,
        "service-cluster-ip-range": SERVICE_CIDR,
        "endpoint-reconciler-type": None,
        "disable-admission-plugins": None,
        "kubelet-client-certificate": str(pki.admin_cert),
        "kubelet-client-key": str(pki.admin_key),
        "kubelet-preferred-address-types": "InternalIP",
    }.items():
        args = set_flag(args, flag, value)
    start("kube-apiserver", args)
    ca_file = cert_dir / "apiserver.crt"
    wait(
        "the API server's serving certificate",
        lambda: ca_file.exists() and b"END CERTIFICATE" in ca_file.read_bytes(),
        60,
        "kube-apiserver",
    )
    write_kubeconfig(
        KUBECONFIG,
        server=f"https://{NODE_IP}:{API_PORT}",
        ca_file=ca_file,
        user={"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
        name="cqrs-local",
    )
    wait("kube-apiserver /readyz", lambda: api_status("/readyz") == 200, 90, "kube-apiserver")
    return ca_file


def api_status(path: str) -> int:
    try:
        client = KubeClient.from_kubeconfig(KUBECONFIG)
        client.timeout = 5.0
        return client.get(path).status
    except OSError:
        return 0


def http_ok(url: str, expect: bytes) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200 and expect in resp.read()
    except OSError:
        return False


def containerd_config() -> Path:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    text = f"""version = 2
root = "{STATE / "containerd"}"
state = "{RUN / "containerd"}"
[grpc]
  address = "{CONTAINERD_SOCK}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM gives root no CAP_SYS_RESOURCE: a negative oom_score_adj (-998 for every pod
  # sandbox) is refused ("failed to update /proc/self/oom_score_adj: Permission denied",
  # seen as runc's "can't get final child's PID from pipe: EOF"). Clamp to containerd's own.
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{RUN / "runc"}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{STATE / "cni"}"
"""
    path = STATE / "containerd.toml"
    write_if_changed(path, text)
    # The pod network: a bridge whose gateway is the node, addresses from host-local, no
    # masquerade (nothing leaves the machine), hostPort support for completeness.
    (STATE / "cni").mkdir(exist_ok=True)
    conflist = {
        "cniVersion": "0.4.0",
        "name": "cqrs-local",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(RUN / "cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    write_if_changed(STATE / "cni" / "10-cqrs-local.conflist", json.dumps(conflist, indent=2))
    return path


def ctr(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(
        "ctr", "--address", str(CONTAINERD_SOCK), "-n", "k8s.io", *args,
        timeout=timeout, check=check,
    )  # fmt: skip


def start_containerd() -> None:
    (RUN / "containerd").mkdir(parents=True, exist_ok=True)
    config = containerd_config()
    start("containerd", [shutil.which("containerd") or "containerd", "--config", str(config)])
    wait(
        "containerd to answer",
        lambda: ctr("version", timeout=5, check=False).returncode == 0,
        60,
        "containerd",
    )
    import_pause_image()


# ------------------------------------------------------------------------ pause image

PAUSE_C = r"""
#include <signal.h>
#include <unistd.h>
#include <sys/wait.h>
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
static void quit(int sig) { (void)sig; _exit(0); }
int main(void) {
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""


def oci_image_tar(name: str, files: dict[str, tuple[bytes, int]], entrypoint: list[str]) -> bytes:
    """A one-layer OCI image layout (as ``ctr images import`` reads it), in memory."""

    def blob(data: bytes, media: str) -> tuple[dict, str, bytes]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return {"mediaType": media, "digest": digest, "size": len(data)}, digest, data

    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as tar:
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    diff_id = "sha256:" + hashlib.sha256(layer_tar.getvalue()).hexdigest()
    layer = gzip.compress(layer_tar.getvalue(), mtime=0)
    layer_desc, _, _ = blob(layer, "application/vnd.oci.image.layer.v1.tar+gzip")
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_desc, _, _ = blob(config, "application/vnd.oci.image.config.v1+json")
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": config_desc, "layers": [layer_desc]}
    ).encode()  # fmt: skip
    manifest_desc, _, _ = blob(manifest, "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": name}
    index = json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:

        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", index)
        for data in (layer, config, manifest):
            add(f"blobs/sha256/{hashlib.sha256(data).hexdigest()}", data)
    return out.getvalue()


def import_pause_image() -> None:
    if PAUSE_IMAGE in ctr("images", "ls", "-q").stdout.split():
        return
    build = STATE / "pause-build"
    build.mkdir(exist_ok=True)
    (build / "pause.c").write_text(PAUSE_C)
    run("gcc", "-Os", "-static", "-o", str(build / "pause"), str(build / "pause.c"))
    run("strip", str(build / "pause"), check=False)
    image = oci_image_tar(
        PAUSE_IMAGE, {"pause": ((build / "pause").read_bytes(), 0o755)}, ["/pause"]
    )
    (build / "pause.tar").write_bytes(image)
    ctr("images", "import", "--index-name", PAUSE_IMAGE, str(build / "pause.tar"))
    log(f"pause image built ({len(image) // 1024} KiB) and imported as {PAUSE_IMAGE}")


# ---------------------------------------------------------------------- node components


def start_controllers(ca_file: Path, pki) -> None:
    kubeconfig = str(KUBECONFIG)
    start(
        "kube-controller-manager",
        [
            str(BIN / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            # Published as the kube-root-ca.crt ConfigMap: pods verify the API server with it.
            f"--root-ca-file={ca_file}",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allocate-node-cidrs=false",
            "--v=1",
        ],
    )
    start(
        "kube-scheduler",
        [
            str(BIN / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
        ],
    )


def start_kubelet(pki) -> None:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki.client_ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        # containerd runs runc with cgroupfs (SystemdCgroup = false): the kubelet must agree.
        "cgroupDriver": "cgroupfs",
        # This machine mounts cgroup v1 (hybrid): supported in 1.34 when not refused.
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDNS": [NODE_IP],
        "clusterDomain": "cluster.local",
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCK}",
        "resolvConf": "/etc/resolv.conf",
        "hairpinMode": "hairpin-veth",
        "serializeImagePulls": False,
        # A shared CI machine: evict only when the disk is really full.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%",
                         "imagefs.available": "2%"},
        "imageGCHighThresholdPercent": 98,
        "imageGCLowThresholdPercent": 95,
        "protectKernelDefaults": False,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
    }  # fmt: skip
    path = STATE / "kubelet.json"
    write_if_changed(path, json.dumps(config, indent=2))
    start(
        "kubelet",
        [
            str(BIN / "kubelet"),
            f"--config={path}",
            f"--kubeconfig={KUBECONFIG}",
            f"--root-dir={STATE / 'kubelet'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--v=1",
        ],
    )


def start_kube_proxy() -> None:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(KUBECONFIG)},
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # NodePorts on the node's bridge address only, never on the machine's own network.
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # Leave the machine's conntrack table size alone.
        "conntrack": {"maxPerCore": 0},
    }
    path = STATE / "kube-proxy.json"
    write_if_changed(path, json.dumps(config, indent=2))
    start("kube-proxy", [str(BIN / "kube-proxy"), f"--config={path}"])
    wait(
        "kube-proxy /healthz",
        lambda: http_ok("http://127.0.0.1:10256/healthz", b""),
        60,
        "kube-proxy",
    )


def start_coredns() -> None:
    corefile = STATE / "Corefile"
    # Only cluster.local and reverse lookups: other names are refused, nothing is forwarded
    # off this machine.
    write_if_changed(
        corefile,
        f""".:53 {{
    bind {NODE_IP}
    errors
    ready {COREDNS_READY}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {KUBECONFIG} cqrs-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""",
    )
    start("coredns", [str(BIN / "coredns"), "-conf", str(corefile)])
    wait(
        "CoreDNS /ready",
        lambda: http_ok(f"http://{COREDNS_READY}/ready", b"OK"),
        60,
        "coredns",
    )


def kubectl(
    *args: str, timeout: float = 30, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(
        str(BIN / "kubectl"), f"--kubeconfig={KUBECONFIG}", *args, timeout=timeout, check=check
    )


def node_ready() -> bool:
    ready = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
    done = kubectl("get", "node", NODE_NAME, "-o", ready, check=False)
    return done.returncode == 0 and done.stdout.strip() == "True"


def default_service_account() -> bool:
    return kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0


# ----------------------------------------------------------------------------- verbs


def up() -> None:
    started = time.monotonic()
    preflight()
    for folder in (STATE, RUN, LOGS):
        folder.mkdir(parents=True, exist_ok=True)
    network_up()
    pki = pki_and_kubeconfig()
    start_etcd()
    ca_file = start_apiserver(pki)
    start_containerd()
    start_controllers(ca_file, pki)
    start_kubelet(pki)
    wait(f"node {NODE_NAME} to be Ready", node_ready, 120, "kubelet")
    start_kube_proxy()
    start_coredns()
    wait("the default ServiceAccount (controller-manager)", default_service_account, 60,
         "kube-controller-manager")  # fmt: skip
    log(f"up in {time.monotonic() - started:.0f} s: export KUBECONFIG={KUBECONFIG}")


def status() -> int:
    down_ones = [name for name in ORDER if not running_pid(name)]
    for name in ORDER:
        pid = running_pid(name)
        print(f"{name:24} {'running (pid ' + str(pid) + ')' if pid else 'stopped'}")
    if not down_ones:
        print(f"node {NODE_NAME}: {'Ready' if node_ready() else 'NOT Ready'}")
        print(f"kubeconfig: {KUBECONFIG}")
    return 0 if not down_ones else 1


def remove_pods() -> None:
    """Kill and remove every container and sandbox of our containerd (namespace k8s.io)."""
    if not running_pid("containerd"):
        return
    tasks = ctr("tasks", "ls", "-q", check=False).stdout.split()
    for task in tasks:
        ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=20)
    for task in tasks:
        ctr("tasks", "delete", "-f", task, check=False, timeout=20)
    for container in ctr("containers", "ls", "-q", check=False).stdout.split():
        ctr("containers", "delete", container, check=False, timeout=20)
    log(f"removed {len(tasks)} containers")


def our_shims() -> list[int]:
    """Shims of our containerd (they outlive it): matched by our socket path only."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"containerd-shim-runc-v2")
            and str(CONTAINERD_SOCK).encode() in cmdline
        ):
            pids.append(int(proc.name))
    return pids


def unmount_under(*roots: Path) -> None:
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    ours = [m for m in mounts if any(m == str(r) or m.startswith(f"{r}/") for r in roots)]
    for mount in sorted(ours, key=len, reverse=True):
        run("umount", "-l", mount, check=False)


def remove_netns() -> None:
    """The pods' network namespaces (containerd 1.6 pins them as /run/netns/cni-*)."""
    netns = Path("/run/netns")
    if not netns.is_dir():
        return
    for entry in netns.glob("cni-*"):
        run("umount", str(entry), check=False)
        entry.unlink(missing_ok=True)
    try:
        netns.rmdir()  # only when empty
    except OSError:
        pass


def remove_iptables() -> None:
    """kube-proxy's own cleanup, then the chains the kubelet and CNI portmap made."""
    if os.access(BIN / "kube-proxy", os.X_OK):
        run(str(BIN / "kube-proxy"), "--cleanup", check=False, timeout=60)
    for table in ("filter", "nat", "mangle"):
        dump = run("iptables-save", "-t", table, check=False).stdout.splitlines()
        chains = [line[1:].split()[0] for line in dump if line.startswith(":")]
        ours = [c for c in chains if c.startswith(("KUBE-", "CNI-"))]
        for line in dump:  # rules in built-in chains that jump to ours
            parts = line.split()
            if line.startswith("-A ") and "-j" in parts and parts[parts.index("-j") + 1] in ours:
                if parts[1] not in ours:
                    run("iptables", "-t", table, "-D", *parts[1:], check=False)
        for chain in ours:
            run("iptables", "-t", table, "-F", chain, check=False)
        for chain in ours:
            run("iptables", "-t", table, "-X", chain, check=False)


def remove_cgroups() -> None:
    """The kubepods hierarchy the kubelet made (cgroupfs driver), deepest first."""
    for controller in Path("/sys/fs/cgroup").iterdir():
        top = controller / "kubepods"
        if not top.is_dir():
            continue
        for folder in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir():
                try:
                    folder.rmdir()
                except OSError:
                    pass
        try:
            top.rmdir()
        except OSError:
            pass


def down() -> None:
    # Control plane first: nothing recreates the pods while they are being removed.
    for name in ("kube-scheduler", "kube-controller-manager", "kubelet", "kube-proxy", "coredns"):
        stop(name)
    remove_pods()
    stop("containerd")
    for pid in our_shims():
        os.kill(pid, signal.SIGKILL)
    stop("kube-apiserver")
    stop("etcd")
    unmount_under(STATE, RUN)
    remove_netns()
    remove_iptables()
    remove_cgroups()
    if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        run("ip", "link", "delete", BRIDGE, check=False)
    saved = STATE / "sysctl-before.json"
    if saved.exists():
        for key, value in json.loads(saved.read_text()).items():
            Path(f"/proc/sys/{key}").write_text(value)
    shutil.rmtree(RUN, ignore_errors=True)
    if os.environ.get("CQRS_CLUSTER_KEEP_STATE") != "1":
        shutil.rmtree(STATE, ignore_errors=True)
    log("down: processes stopped, pods, mounts, bridge, iptables chains and state removed")


def main(argv: list[str]) -> int:
    verb = argv[1] if len(argv) > 1 else ""
    try:
        if verb == "up":
            up()
        elif verb == "down":
            down()
        elif verb == "status":
            return status()
        else:
            print("usage: python -m tests.cluster.local_cluster up|down|status", file=sys.stderr)
            return 2
    except ClusterUpError as err:
        print(f"cluster: {verb} failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
