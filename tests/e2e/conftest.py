"""Fixtures of the end-to-end suite: a cluster, a namespace, the Helm release, a second stack.

With no cluster configured (``E2E_KUBECONFIG`` unset) every e2e test skips at once with
the exact reason, printed at the end of the run. ``make e2e`` configures one.

Environment:
  E2E_KUBECONFIG    the cluster (required to run); E2E_CONTEXT: a context in it.
  E2E_HELM_ARGS     extra ``helm install`` arguments, e.g. ``-f offline-images.yaml``.
  E2E_TIMEOUT       seconds to wait for a stack to be Ready (default 300).
  E2E_KEEP          1: leave the namespace and release for a post-mortem.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.cluster import CHART, Cluster, ClusterError, no_cluster_reason, wait_until

RELEASE = "e2e"
RELEASE_STACK = "alpha"
SECOND_STACK = "beta"
STACK_TIMEOUT = float(os.environ.get("E2E_TIMEOUT", "300"))

_skipped_because: list[str] = []


# Seconds the operator retries a failing teardown (operator.deleteTimeout) in the suite:
# short, so that a namespace deleted with its admin Secret finishes deleting soon.
DELETE_TIMEOUT = 30


@dataclass
class Namespace:
    name: str
    suffix: str  # unique per run: keeps database names apart on a shared server

    @property
    def tenant(self) -> str:
        """A second namespace the release's operator watches (deleted by a test)."""
        return f"{self.name}-tenant"

    @property
    def operator(self) -> str:
        """The operator's own namespace (the chart's default)."""
        return f"{self.name}-operator"


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    reason = no_cluster_reason()
    if reason:
        _skipped_because.append(reason)
        pytest.skip(reason)
    try:
        found = Cluster.from_environment()
        nodes = found.ready_nodes()
    except ClusterError as err:
        pytest.fail(f"E2E_KUBECONFIG names a cluster that cannot be used: {err}", pytrace=False)
    if not nodes:
        pytest.fail(
            "the cluster of E2E_KUBECONFIG has no Ready node: pods cannot run", pytrace=False
        )
    return found


@pytest.fixture(scope="session")
def namespace(cluster: Cluster) -> Iterator[Namespace]:
    suffix = secrets.token_hex(3)
    ns = Namespace(f"cqrs-e2e-{suffix}", suffix)
    cluster.kubectl("create", "namespace", ns.name)
    # Exists before the install: the chart gives the operator a Role in each watched namespace.
    cluster.kubectl("create", "namespace", ns.tenant)
    try:
        yield ns
    finally:
        if os.environ.get("E2E_KEEP") != "1":
            tear_down(cluster, ns.name, ns.tenant)


def tear_down(cluster: Cluster, namespace: str, tenant: str) -> None:
    """Stacks first (the operator must run their finalizers), then the release, then the
    namespaces. Every step runs even if one before failed; a stack stuck on its finalizer is
    released by hand so nothing is left behind, and the run fails saying what went wrong."""
    problems = []
    for where in (tenant, namespace):
        if cluster.get("namespace", where, where) is None:
            continue  # the tenant namespace is deleted by a test
        done = cluster.kubectl(
            "delete", "cqrsstacks", "--all", "-n", where, "--wait", "--timeout=180s",
            check=False, timeout=200,
        )  # fmt: skip
        if done.returncode != 0:
            problems.append(f"deleting the stacks did not finish: {done.stderr.strip()}")
            cluster.kubectl(
                "patch", "cqrsstacks", "--all", "-n", where, "--type=merge",
                "-p", '{"metadata":{"finalizers":null}}', check=False,
            )  # fmt: skip
    done = cluster.helm(
        "uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "180s", check=False
    )
    if done.returncode != 0 and "not found" not in done.stderr:
        problems.append(f"helm uninstall: {done.stderr.strip()}")
    # The operator's namespace is kept by helm uninstall (helm.sh/resource-policy: keep).
    doomed = [namespace, tenant, f"{namespace}-operator"]
    done = cluster.kubectl(
        "delete", "namespace", *doomed, "--ignore-not-found", "--wait",
        "--timeout=300s", check=False, timeout=320,
    )  # fmt: skip
    if done.returncode != 0:
        problems.append(f"deleting namespaces {', '.join(doomed)}: {done.stderr.strip()}")
    if problems:
        raise ClusterError("; ".join(problems))


@pytest.fixture(scope="session")
def release(cluster: Cluster, namespace: Namespace) -> str:
    """``helm install`` of the chart with the in-cluster PostgreSQL and Redis; returns the
    release stack's name once it is Ready with every replica ready."""
    cluster.helm(
        "install", RELEASE, str(CHART), "-n", namespace.name,
        "--set", "devDatabases.enabled=true",
        # No PersistentVolume needed: any cluster, even one without a storage class.
        "--set", "devDatabases.postgresql.persistence.enabled=false",
        "--set", f"stack.name={RELEASE_STACK}",
        "--set", "stack.writeApi.replicas=1",
        "--set", "stack.readApi.replicas=1",
        "--set", f"operator.watchNamespaces={{{namespace.name},{namespace.tenant}}}",
        "--set", f"operator.deleteTimeout={DELETE_TIMEOUT}",
        *shlex.split(os.environ.get("E2E_HELM_ARGS", "")),
        "--wait", "--timeout", f"{int(STACK_TIMEOUT)}s",
        timeout=STACK_TIMEOUT + 60,
    )  # fmt: skip
    wait_for_stack(cluster, RELEASE_STACK, namespace.name)
    return RELEASE_STACK


@pytest.fixture(scope="session")
def second_stack(cluster: Cluster, namespace: Namespace, release: str) -> str:
    """A second CqrsStack by ``kubectl apply``: the same servers as the release's stack,
    its own databases, ``deletionPolicy: Delete``."""
    first = cluster.get("cqrsstack", release, namespace.name)
    assert first is not None, f"the release's CqrsStack {release} is gone"
    databases = json.loads(json.dumps(first["spec"]["databases"]))
    for which in ("write", "read"):
        databases[which]["database"] = f"e2e_{namespace.suffix}_{SECOND_STACK}_{which}"
    cluster.apply(
        {
            "apiVersion": "cqrs.dev/v1alpha1",
            "kind": "CqrsStack",
            "metadata": {"name": SECOND_STACK},
            "spec": {
                "image": first["spec"]["image"],
                "writeApi": {"replicas": 1},
                "readApi": {"replicas": 1},
                "projector": {"replicas": 1},
                "databases": databases,
                "redis": first["spec"]["redis"],
                "deletionPolicy": "Delete",
            },
        },
        namespace.name,
    )
    wait_for_stack(cluster, SECOND_STACK, namespace.name)
    return SECOND_STACK


def deployment_ready(
    cluster: Cluster, name: str, namespace: str, replicas: int | None = None
) -> bool:
    deployment = cluster.get("deployment", name, namespace)
    if deployment is None:
        return False
    want = deployment["spec"].get("replicas", 1) if replicas is None else replicas
    status = deployment.get("status", {})
    return bool(
        deployment["spec"].get("replicas", 1) == want
        and status.get("observedGeneration") == deployment["metadata"]["generation"]
        and status.get("updatedReplicas", 0) == want
        and status.get("readyReplicas", 0) == want
        and status.get("replicas", 0) == want
    )


def wait_for_stack(cluster: Cluster, name: str, namespace: str) -> None:
    """Phase Ready for the current generation, and every pod of its Deployments ready."""

    def ready() -> bool:
        stack = cluster.get("cqrsstack", name, namespace)
        if stack is None:
            return False
        status = stack.get("status", {})
        if status.get("phase") != "Ready":
            return False
        if status.get("observedGeneration") != stack["metadata"]["generation"]:
            return False
        return all(
            deployment_ready(cluster, f"{name}-{component}", namespace)
            for component in ("write-api", "read-api", "projector")
        )

    wait_until(
        f"CqrsStack {namespace}/{name} to be Ready with its pods",
        ready,
        STACK_TIMEOUT,
        diagnose=lambda: cluster.diagnostics(namespace),
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say why the e2e suite skipped, even without ``-rs``."""
    if _skipped_because:
        terminalreporter.write_line(f"e2e suite skipped: {_skipped_because[0]}", yellow=True)
