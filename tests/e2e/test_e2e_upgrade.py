"""End to end: `helm upgrade` from the previous release to this tree loses nothing and keeps
reads available.

Release N is the previous release's chart and images (``E2E_PREVIOUS_CHART``,
``E2E_PREVIOUS_TAG``: tests/cluster/previous-release.sh builds them from a git worktree of
``CQRS_PREVIOUS_REF``), installed in a namespace of its own. Keys are written, then the
release is upgraded to this chart while a bounded reader reads them through the read-api
Service (the API server's service proxy picks a ready endpoint per request) and a writer keeps
writing. After the upgrade the stack runs this tree's image, migrated by that image's own Job,
every read during the upgrade was answered, and every acknowledged write is readable.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import CHART, REPO_ROOT, Cluster, ClusterError, wait_until
from tests.e2e.conftest import STACK_TIMEOUT, tear_down, wait_for_stack

RELEASE = "up"
STACK = "upgraded"
KEYS = 20
# Bounds of the loops that run during the upgrade.
UPGRADE_TIMEOUT = 300.0
READ_INTERVAL = 0.2


@dataclass
class Traffic:
    """What the reader and the writer saw while the upgrade ran."""

    reads: int = 0
    failed_reads: list[str] = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)


def previous_release() -> tuple[Path, str]:
    chart, tag = os.environ.get("E2E_PREVIOUS_CHART", ""), os.environ.get("E2E_PREVIOUS_TAG", "")
    if not chart or not tag:
        pytest.skip(
            "no previous release: E2E_PREVIOUS_CHART and E2E_PREVIOUS_TAG are set by "
            "`make e2e-local` (tests/cluster/previous-release.sh)"
        )
    path = Path(chart) if Path(chart).is_absolute() else REPO_ROOT / chart
    return path, tag


def proxy_path(namespace: str, service: str, path: str) -> str:
    return f"/api/v1/namespaces/{namespace}/services/{service}:80/proxy{path}"


def read_key(cluster: Cluster, namespace: str, key: str) -> dict[str, Any]:
    done = cluster.kubectl(
        "get", "--raw", proxy_path(namespace, f"{STACK}-read-api", f"/read/{key}"),
        timeout=20, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise ClusterError(done.stderr.strip()[-300:])
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def reader(cluster: Cluster, namespace: str, keys: list[str], traffic: Traffic) -> None:
    deadline = time.monotonic() + UPGRADE_TIMEOUT
    while not traffic.stop.is_set() and time.monotonic() < deadline:
        key = keys[traffic.reads % len(keys)]
        traffic.reads += 1
        try:
            answer = read_key(cluster, namespace, key)
            if answer.get("success") is not True:
                traffic.failed_reads.append(f"{key}: {answer}")
        except (ClusterError, ValueError) as exc:
            traffic.failed_reads.append(f"{key}: {exc}")
        traffic.stop.wait(READ_INTERVAL)


def writer(cluster: Cluster, namespace: str, traffic: Traffic) -> None:
    """Write through a port-forward, reopened when its pod goes; only 200s count."""
    deadline = time.monotonic() + UPGRADE_TIMEOUT
    count = 0
    while not traffic.stop.is_set() and time.monotonic() < deadline:
        try:
            with cluster.port_forward(f"{STACK}-write-api", 80, namespace) as url:
                while not traffic.stop.is_set() and time.monotonic() < deadline:
                    key, value = f"during:{count}", secrets.token_hex(4)
                    count += 1
                    answer = httpx.post(
                        f"{url}/write", json={"key": key, "value": value}, timeout=10
                    )
                    if answer.status_code == 200:
                        traffic.acknowledged[key] = value
                    traffic.stop.wait(0.5)
        except (ClusterError, httpx.HTTPError):
            traffic.stop.wait(1.0)  # the forwarded pod went away: open a new forward


def install_previous(cluster: Cluster, namespace: str, chart: Path, tag: str) -> None:
    cluster.helm(
        "install", RELEASE, str(chart), "-n", namespace,
        *release_values(namespace),
        "--set", f"operator.image.tag={tag}",
        "--set", f"stack.image.tag={tag}",
        "--wait", "--timeout", f"{int(STACK_TIMEOUT)}s",
        timeout=STACK_TIMEOUT + 60,
    )  # fmt: skip


def release_values(namespace: str) -> list[str]:
    return [
        "--set", "devDatabases.enabled=true",
        "--set", "devDatabases.postgresql.persistence.enabled=false",
        "--set", f"stack.name={STACK}",
        "--set", "stack.writeApi.replicas=1",
        "--set", "stack.readApi.replicas=2",
        "--set", f"operator.watchNamespaces={{{namespace}}}",
        "--set", "operator.deleteTimeout=30",
        *shlex.split(os.environ.get("E2E_HELM_ARGS", "")),
    ]  # fmt: skip


def test_helm_upgrade_from_the_previous_release_loses_nothing(cluster: Cluster) -> None:
    chart, tag = previous_release()
    namespace = f"cqrs-up-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", namespace)
    started = time.monotonic()
    try:
        # Release N's CRD as N installed it (Helm keeps an existing CRD, so set it back).
        exists = cluster.get("crd", "cqrsstacks.cqrs.dev", "default") is not None
        crd_file = str(chart / "crds" / "cqrsstacks.cqrs.dev.yaml")
        cluster.kubectl("replace" if exists else "create", "-f", crd_file)
        install_previous(cluster, namespace, chart, tag)
        wait_for_stack(cluster, STACK, namespace)
        installed = time.monotonic()
        keys = [f"before:{i}" for i in range(KEYS)]
        with cluster.port_forward(f"{STACK}-write-api", 80, namespace) as url:
            for key in keys:
                answer = httpx.post(f"{url}/write", json={"key": key, "value": key}, timeout=30)
                assert answer.status_code == 200, answer.text
        wait_until(
            "the keys written before the upgrade are readable",
            lambda: read_key(cluster, namespace, keys[-1]).get("success") is True,
            60,
        )

        traffic = Traffic()
        threads = [
            threading.Thread(target=reader, args=(cluster, namespace, keys, traffic)),
            threading.Thread(target=writer, args=(cluster, namespace, traffic)),
        ]
        for thread in threads:
            thread.start()
        try:
            cluster.helm(
                "upgrade", RELEASE, str(CHART), "-n", namespace, *release_values(namespace),
                "--wait", "--timeout", f"{int(UPGRADE_TIMEOUT)}s", timeout=UPGRADE_TIMEOUT + 60,
            )  # fmt: skip
            wait_until(
                "the stack on this tree's image, migrated by its own Job",
                lambda: upgraded(cluster, namespace),
                UPGRADE_TIMEOUT,
                diagnose=lambda: cluster.diagnostics(namespace),
            )
            wait_for_stack(cluster, STACK, namespace)
        finally:
            traffic.stop.set()
            for thread in threads:
                thread.join(timeout=60)
        upgrade_seconds = time.monotonic() - installed
        # Helm left crds/ alone; the new operator applied this tree's CRD at its start.
        crd = json.loads(
            cluster.kubectl(
                "get", "crd", "cqrsstacks.cqrs.dev", "-o", "json", "--show-managed-fields"
            ).stdout
        )
        managers = {m.get("manager") for m in crd["metadata"].get("managedFields", [])}
        assert "cqrs-stack" in managers, managers
        image = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert "default" not in image["properties"]["image"]["properties"]["tag"]

        assert traffic.reads >= 10, traffic
        assert not traffic.failed_reads, (
            f"{len(traffic.failed_reads)} of {traffic.reads} reads failed during the upgrade: "
            f"{traffic.failed_reads[:5]}"
        )
        for key in keys:
            assert read_key(cluster, namespace, key).get("value") == key, key
        assert traffic.acknowledged, "no write was acknowledged during the upgrade"

        def all_acknowledged_readable() -> bool:
            return all(
                read_key(cluster, namespace, k).get("value") == v
                for k, v in traffic.acknowledged.items()
            )

        wait_until("every acknowledged write readable", all_acknowledged_readable, 60)
        print(
            f"upgrade: install {installed - started:.0f} s, upgrade {upgrade_seconds:.0f} s, "
            f"{traffic.reads} reads, {len(traffic.acknowledged)} writes acknowledged during it"
        )
    finally:
        tear_down_release(cluster, namespace)


def upgraded(cluster: Cluster, namespace: str) -> bool:
    stack = cluster.get("cqrsstack", STACK, namespace) or {}
    version = current_version()
    migrated = (stack.get("status") or {}).get("databases", {}).get("migratedImage", "")
    if migrated != f"cqrs-stack:{version}":
        return False
    for component in ("write-api", "read-api", "projector"):
        dep = cluster.get("deployment", f"{STACK}-{component}", namespace) or {}
        image = dep.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])
        if image[0].get("image") != f"cqrs-stack:{version}":
            return False
    return True


def current_version() -> str:
    import tomllib

    with open(REPO_ROOT / "pyproject.toml", "rb") as source:
        version: str = tomllib.load(source)["project"]["version"]
    return version


def tear_down_release(cluster: Cluster, namespace: str) -> None:
    """As the session's teardown: stacks, release, namespaces (the operator's included)."""
    if os.environ.get("E2E_KEEP") == "1":
        return
    # The release's namespace has no tenant namespace: the teardown skips a missing one.
    tear_down(cluster, namespace, f"{namespace}-no-tenant")
