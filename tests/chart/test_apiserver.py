"""The real kube-apiserver accepts every object the chart renders, and a real ``helm install``
keeps its generated passwords across upgrades (``lookup``).

No pod ever runs here (no kubelet): the API server validates and stores the objects, which is
what a chart can get wrong (schemas, CRD validation, immutable fields, RBAC objects).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chart import (
    CHART,
    VALUES_FILES,
    Doc,
    helm,
    render,
    secret_data,
    values_id,
)
from tests.fixtures.control_plane import ControlPlaneError, find_cached_tool, wait_for

CRD = CHART / "crds" / "cqrsstacks.cqrs.dev.yaml"
KUBECTL_TIMEOUT = 60


class Kubectl:
    """kubectl with the fixture's admin kubeconfig and a private discovery cache."""

    def __init__(self, kubeconfig: Path, cache: Path) -> None:
        self.kubeconfig, self.cache = kubeconfig, cache

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [
                str(find_cached_tool("kubectl")),
                f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.cache}",
                *args,
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=KUBECTL_TIMEOUT,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"kubectl {' '.join(args)}:\n{done.stderr}"
        return done

    def ensure_namespace(self, name: str) -> None:
        manifest = yaml.safe_dump(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )
        self("apply", "--server-side", "--field-manager=chart-tests", "-f", "-", stdin=manifest)

    def secret(self, namespace: str, name: str) -> Doc:
        done = self("get", "secret", name, "-n", namespace, "-o", "yaml")
        return yaml.safe_load(done.stdout)


@pytest.fixture(scope="session")
def kubectl(kube_apiserver: Any, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    """kubectl against the fixture API server, with the chart's CRD installed and established."""
    run = Kubectl(kube_apiserver.kubeconfig, tmp_path_factory.mktemp("kubectl-cache"))
    run(
        "apply", "--server-side", "--force-conflicts", "--field-manager=chart-tests", "-f", str(CRD)
    )
    run("wait", "--for=condition=Established", "crd/cqrsstacks.cqrs.dev", "--timeout=30s")
    return run


@pytest.fixture
def release_namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"chart-{uuid.uuid4().hex[:8]}"
    kubectl.ensure_namespace(name)
    yield name


def server_dry_run(kubectl: Kubectl, docs: list[Doc]) -> str:
    """Server-side apply of ``docs`` with dryRun=All; retried (bounded) while discovery lags."""
    stream = yaml.safe_dump_all(docs)
    result: dict[str, subprocess.CompletedProcess[str]] = {}

    def applied() -> bool:
        done = kubectl(
            "apply", "--server-side", "--dry-run=server", "--field-manager=chart-tests",
            "-f", "-", stdin=stream, check=False,
        )  # fmt: skip
        result["done"] = done
        lagging = "ensure CRDs are installed first" in done.stderr
        return done.returncode == 0 or not lagging

    try:
        wait_for(applied, timeout=30, interval=0.5, what="the CqrsStack kind in discovery")
    except ControlPlaneError:
        pass
    done = result["done"]
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)
def test_every_rendered_object_is_accepted_by_the_api_server(
    kubectl: Kubectl, release_namespace: str, values_file: Path | None
) -> None:
    docs = render(values_file, namespace=release_namespace)
    for namespace in {d["metadata"].get("namespace") for d in docs} - {None}:
        kubectl.ensure_namespace(namespace)
    out = server_dry_run(kubectl, docs)
    for doc in docs:
        kind, name = doc["kind"].lower(), doc["metadata"]["name"]
        assert f"{name} serverside-applied (server dry run)" in out, f"{kind}/{name}:\n{out}"


def test_the_api_server_refuses_a_stack_the_schema_forbids(
    kubectl: Kubectl, release_namespace: str
) -> None:
    """The chart's schema and the CRD agree: a value the chart schema would have refused is
    refused by the CRD too when a stack is written by hand."""
    (stack,) = [d for d in render(namespace=release_namespace) if d["kind"] == "CqrsStack"]
    stack["spec"]["writeApi"]["replicas"] = -1
    done = kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", "-",
        stdin=yaml.safe_dump(stack), check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "spec.writeApi.replicas" in done.stderr


def passwords(kubectl: Kubectl, namespace: str, release: str) -> dict[str, str]:
    pg = secret_data(kubectl.secret(namespace, f"{release}-cqrs-stack-postgresql"))
    redis = secret_data(kubectl.secret(namespace, f"{release}-cqrs-stack-redis"))
    assert redis["url"].startswith(f"redis://:{redis['password']}@")
    return {"postgresql": pg["password"], "redis": redis["password"]}


def test_helm_install_upgrade_and_reinstall_keep_the_generated_passwords(
    kubectl: Kubectl, kube_apiserver: Any, release_namespace: str
) -> None:
    release = "keep"
    common = [str(CHART), "-n", release_namespace, f"--kubeconfig={kube_apiserver.kubeconfig}"]

    installed = helm("install", release, *common, timeout=120)
    assert "STATUS: deployed" in installed.stdout
    assert f"port-forward svc/{release}-write-api 8001:80" in installed.stdout
    assert "curl -s localhost:8002/read/user:1" in installed.stdout
    first = passwords(kubectl, release_namespace, release)

    helm("upgrade", release, *common, "--set", "stack.readApi.replicas=3", timeout=120)
    assert passwords(kubectl, release_namespace, release) == first
    stack = yaml.safe_load(
        kubectl("get", "cqrs", release, "-n", release_namespace, "-o", "yaml").stdout
    )
    assert stack["spec"]["readApi"]["replicas"] == 3

    # The PostgreSQL Secret outlives the release (its data volume does too)...
    helm("uninstall", release, *common[1:], timeout=120)
    kubectl.secret(release_namespace, f"{release}-cqrs-stack-postgresql")
    # ...so a new install of the same release finds the same password.
    helm("install", release, *common, timeout=120)
    again = passwords(kubectl, release_namespace, release)
    assert again["postgresql"] == first["postgresql"]
    helm("uninstall", release, *common[1:], timeout=120)
