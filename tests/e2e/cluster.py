"""A real Kubernetes cluster for the end-to-end suite, driven only through kubectl and helm.

The suite runs unchanged against whichever cluster ``E2E_KUBECONFIG`` names (and
``E2E_CONTEXT``, if set): kind (``make e2e``), or any other cluster with our images. It is
opt-in: the kubeconfig a developer happens to have is never used unless named, so a plain
``pytest`` run cannot install into somebody's real cluster.

Everything cluster-specific is here: finding the tools, why there is no cluster, running
kubectl, waiting with a deadline, port-forwards on loopback, psql inside the dev PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_BIN = REPO_ROOT / ".cache" / "bin"
CHART = REPO_ROOT / "charts" / "cqrs-stack"
PRIVATE_DOCKER_HOST = "unix:///run/cqrs-docker.sock"  # tests/images/docker-engine.sh

T = TypeVar("T")


class ClusterError(RuntimeError):
    """A kubectl/helm command failed, or the cluster did not reach a state in time."""


def find_tool(name: str) -> str | None:
    """``.cache/bin/<name>`` (built by the tools scripts), else ``<name>`` on PATH."""
    cached = CACHE_BIN / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which(name)


def _quick(args: list[str], timeout: float = 5.0) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def kind_unavailable_reason() -> str:
    """Why ``make e2e`` could not make a kind cluster here (checked in a few seconds)."""
    if find_tool("kind") is None:
        return "kind is not built (make dev-tools)"
    docker = find_tool("docker")
    if docker is None:
        return "docker is not installed"
    # The engine DOCKER_HOST (or the default socket) names, else the private engine that
    # tests/images/docker-engine.sh starts.
    engine: list[str] = []
    for candidate in ([], ["--host", PRIVATE_DOCKER_HOST]):
        info = _quick([docker, *candidate, "version", "--format", "{{.Server.Version}}"])
        if info is not None and info.returncode == 0:
            engine = [docker, *candidate]
            break
    else:
        return "no Docker engine is running"
    wanted = os.environ.get("KIND_NODE_IMAGE", "")
    listing = _quick([*engine, "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"])
    images = listing.stdout.split() if listing and listing.returncode == 0 else []
    if wanted and wanted not in images:
        return f"KIND_NODE_IMAGE={wanted} is not in the local Docker engine"
    if not wanted and not any(image.startswith("kindest/node:") for image in images):
        return "kindest/node image is not available offline (no registry can be reached)"
    return ""


def no_cluster_reason() -> str:
    """The exact reason the e2e suite skips, or "" when a cluster is configured."""
    if os.environ.get("E2E_KUBECONFIG"):
        return ""
    # Set by tests/e2e/kind.sh when `kind create cluster` failed: kind's own words.
    if os.environ.get("E2E_NO_CLUSTER_REASON"):
        return f"no cluster: {os.environ['E2E_NO_CLUSTER_REASON']}"
    why_not_kind = kind_unavailable_reason()
    if why_not_kind:
        return f"no cluster: {why_not_kind} and E2E_KUBECONFIG is not set"
    return (
        "no cluster: E2E_KUBECONFIG is not set (`make e2e` creates a kind cluster and "
        "runs this suite against it)"
    )


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 2.0,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until it returns something other than None/False; bounded.

    On timeout, raises with ``what``, the last probe error and ``diagnose()``'s report.
    """
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            result = probe()
        except ClusterError as err:
            result, last_error = None, str(err)
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            report = diagnose() if diagnose else ""
            detail = f"\nlast error: {last_error}" if last_error else ""
            raise ClusterError(
                f"timed out after {timeout:.0f} s waiting for {what}{detail}\n{report}"
            )
        time.sleep(interval)


@dataclass
class Cluster:
    """One cluster, named by a kubeconfig (and optionally a context)."""

    kubeconfig: Path
    context: str
    kubectl_bin: str
    helm_bin: str

    @classmethod
    def from_environment(cls) -> Cluster:
        kubeconfig = Path(os.environ["E2E_KUBECONFIG"]).expanduser()
        if not kubeconfig.is_file():
            raise ClusterError(f"E2E_KUBECONFIG={kubeconfig} is not a file")
        kubectl, helm = find_tool("kubectl"), find_tool("helm")
        if kubectl is None or helm is None:
            raise ClusterError("kubectl and helm are needed: run `make k8s-tools`")
        return cls(kubeconfig, os.environ.get("E2E_CONTEXT", ""), kubectl, helm)

    # ---- running tools --------------------------------------------------------------
    def _target(self, context_flag: str) -> list[str]:
        args = ["--kubeconfig", str(self.kubeconfig)]
        return [*args, context_flag, self.context] if self.context else args

    def kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._run(
            [self.kubectl_bin, *self._target("--context"), *args], stdin, timeout, check
        )

    def helm(
        self, *args: str, timeout: float = 600.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._run(
            [self.helm_bin, *self._target("--kube-context"), *args], None, timeout, check
        )

    @staticmethod
    def _run(
        argv: list[str], stdin: str | None, timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        # The tool and its arguments, without the kubeconfig path (argv[1:3]).
        shown = f"{Path(argv[0]).name} {' '.join(argv[3:])}"[:300]
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise ClusterError(f"{shown}: no answer within {timeout:.0f} s") from err
        if check and done.returncode != 0:
            raise ClusterError(f"{shown}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
        return done

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The object as a dict, or None when it does not exist."""
        done = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if done.returncode != 0:
            if "NotFound" in done.stderr or "not found" in done.stderr:
                return None
            raise ClusterError(f"kubectl get {kind} {name}: {done.stderr.strip()}")
        obj: dict[str, Any] = json.loads(done.stdout)
        return obj

    def apply(self, manifest: dict[str, Any], namespace: str) -> None:
        self.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))

    def secret_value(self, name: str, key: str, namespace: str) -> str:
        secret = self.get("secret", name, namespace)
        if secret is None or key not in secret.get("data", {}):
            raise ClusterError(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(secret["data"][key]).decode()

    # ---- checks ---------------------------------------------------------------------
    def ready_nodes(self) -> list[str]:
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json", timeout=20).stdout)
        ready = []
        for node in nodes["items"]:
            conditions = node.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                ready.append(node["metadata"]["name"])
        return ready

    def diagnostics(self, namespace: str, operator_namespace: str | None = None) -> str:
        """What a failed wait needs: pods, events, the operator's log tail (the operator runs
        in ``<release namespace>-operator`` by default)."""
        parts = []
        operator_ns = operator_namespace or f"{namespace}-operator"
        for args in (
            ("get", "pods,deployments,cqrsstacks", "-n", namespace, "-o", "wide"),
            ("get", "events", "-n", namespace, "--sort-by=.lastTimestamp"),
            ("logs", "-n", operator_ns, "-l", "app.kubernetes.io/component=operator", "--tail=40"),
        ):
            done = self.kubectl(*args, check=False, timeout=20)
            parts.append(f"$ kubectl {' '.join(args)}\n{done.stdout}{done.stderr}"[-4000:])
        return "\n".join(parts)

    # ---- port-forward and psql ------------------------------------------------------
    @contextmanager
    def port_forward(self, service: str, port: int, namespace: str) -> Iterator[str]:
        """``kubectl port-forward svc/<service>`` on a free loopback port; yields its URL."""
        argv = [self.kubectl_bin, *self._target("--context"), "port-forward", "-n", namespace]
        argv += ["--address", "127.0.0.1", f"svc/{service}", f"0:{port}"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:41234 -> 8000"
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            if match is None:
                proc.kill()
                _, err = proc.communicate(timeout=10)
                raise ClusterError(f"port-forward to svc/{service} failed: {line}{err.strip()}")
            yield f"http://127.0.0.1:{match.group(1)}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def psql(self, service: str, admin_secret: str, sql: str, namespace: str) -> str:
        """Run ``sql`` with psql inside a pod behind ``service`` (the dev PostgreSQL).

        The admin password goes through stdin, so it is in no command line and no log.
        """
        svc = self.get("service", service, namespace)
        if svc is None:
            raise ClusterError(f"no Service {namespace}/{service} for PostgreSQL")
        selector = ",".join(f"{k}={v}" for k, v in svc["spec"]["selector"].items())
        pods = self.kubectl(
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ).stdout.split()
        if not pods:
            raise ClusterError(f"no pod behind Service {namespace}/{service}")
        user = self.secret_value(admin_secret, "username", namespace)
        password = self.secret_value(admin_secret, "password", namespace)
        script = (
            'read -r PGPASSWORD; export PGPASSWORD; exec psql -h 127.0.0.1 -U "$1" -d postgres '
            '-v ON_ERROR_STOP=1 -tA -c "$2"'
        )
        done = self.kubectl(
            "exec",
            "-i",
            "-n",
            namespace,
            pods[0],
            "--",
            "sh",
            "-c",
            script,
            "psql",
            user,
            sql,
            stdin=password + "\n",
        )
        return done.stdout
