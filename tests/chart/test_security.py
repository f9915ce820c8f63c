"""Every pod the chart renders, and every pod the operator renders for a stack, is hardened;
generated secrets are random and stay in Secrets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cqrs_operator import manifests
from cqrs_operator.spec import parse_spec
from tests.chart.chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    VALUES_FILES,
    Doc,
    named,
    of_kind,
    one,
    pod_specs,
    render,
    secret_data,
    selector_matches,
    values_id,
)

values_files = pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)
# Pods that talk to the API server; every other pod gets no token.
NEEDS_TOKEN = {f"Deployment/{RELEASE}-cqrs-stack-operator"}


def assert_hardened(where: str, pod: dict[str, Any]) -> None:
    """The house's pod security baseline (restricted Pod Security Standard and more)."""
    pod_ctx = pod.get("securityContext") or {}
    assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(flag), f"{where}: {flag}"
    for volume in pod.get("volumes") or []:
        assert "hostPath" not in volume, f"{where}: hostPath volume {volume['name']}"
    containers = (pod.get("initContainers") or []) + pod["containers"]
    for container in containers:
        name = f"{where} container {container['name']}"
        ctx = container.get("securityContext") or {}
        non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
        assert non_root is True, f"{name}: runAsNonRoot"
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 1)) != 0, f"{name}: uid 0"
        assert ctx.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
        assert ctx.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
        assert not ctx.get("privileged"), f"{name}: privileged"
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities"
        assert not ctx.get("capabilities", {}).get("add"), f"{name}: added capabilities"
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", f"{name}: seccomp"
        resources = container.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        assert {"cpu", "memory"} <= set(requests), f"{name}: requests {requests}"
        assert "memory" in limits, f"{name}: limits {limits}"


@values_files
def test_every_rendered_pod_is_hardened(values_file: Path | None) -> None:
    pods = list(pod_specs(render(values_file)))
    assert pods
    for where, pod in pods:
        assert_hardened(where, pod)
        if where not in NEEDS_TOKEN:
            assert pod.get("automountServiceAccountToken") is False, where


def test_chart_pods_run_as_the_images_users() -> None:
    docs = render()
    uids = {where: pod["securityContext"]["runAsUser"] for where, pod in pod_specs(docs)}
    assert uids == {
        f"Deployment/{RELEASE}-cqrs-stack-operator": manifests.RUN_AS,
        f"Deployment/{RELEASE}-cqrs-stack-redis": 999,
        f"StatefulSet/{RELEASE}-cqrs-stack-postgresql": 999,
        f"Pod/{RELEASE}-cqrs-stack-test-write-read": manifests.RUN_AS,  # the stack image's
    }


@values_files
def test_the_stacks_pods_the_operator_renders_are_hardened(values_file: Path | None) -> None:
    """The release stack's Deployments, as the operator renders them from the chart's spec."""
    stacks = of_kind(render(values_file), "CqrsStack")
    for stack in stacks:
        meta = stack["metadata"]
        spec = parse_spec(stack["spec"], namespace=meta["namespace"], name=meta["name"])
        for doc in manifests.workloads(spec, "digest", spec.projector.replicas):
            if doc["kind"] == "Deployment":
                pod = doc["spec"]["template"]["spec"]
                assert_hardened(f"stack Deployment/{doc['metadata']['name']}", pod)
                assert pod["automountServiceAccountToken"] is False


@values_files
def test_secret_values_appear_only_in_secrets(values_file: Path | None) -> None:
    docs = render(values_file)
    secrets = [v for s in of_kind(docs, "Secret") for v in secret_data(s).values() if len(v) >= 16]
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        for value in secrets:
            assert value not in text, f"a Secret value appears in {doc['kind']}"
        if doc["kind"] == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                assert not re.search(r"password|secret|token", key, re.I), key
                assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"credentials in {key}"


def test_the_operators_config_map_holds_no_secret() -> None:
    stack = one(render(), "CqrsStack")
    spec = parse_spec(stack["spec"], namespace="shop", name=stack["metadata"]["name"])
    data = manifests.config_map(spec)["data"]
    secret = manifests.credentials_data(spec, "s3cr3t-password", "redis://:pw@redis:6379/0")
    for key, value in data.items():
        assert key not in manifests.SECRET_URL_KEYS and "password" not in key.lower()
        assert "s3cr3t-password" not in value and "@" not in value
    assert set(manifests.SECRET_URL_KEYS) <= set(secret)


def generated(docs: list[Doc]) -> dict[str, str]:
    pg = secret_data(named(docs, "Secret", f"{RELEASE}-cqrs-stack-postgresql"))
    redis = secret_data(named(docs, "Secret", f"{RELEASE}-cqrs-stack-redis"))
    return {"postgresql": pg["password"], "redis": redis["password"]}


def test_generated_passwords_differ_between_renders() -> None:
    first, second = generated(render()), generated(render())
    for which in first:
        assert first[which] != second[which], which
        assert re.fullmatch(r"[A-Za-z0-9]{32}", first[which]), which
    assert first["postgresql"] != first["redis"]


def test_no_fixed_password_in_the_chart() -> None:
    """No values key holds a password, and no template writes a literal one."""
    for path in [CHART / "values.yaml", *(CHART / "examples").glob("*.yaml")]:
        text = path.read_text()
        assert not re.search(r"^\s*password\s*:", text, re.M | re.I), path.name
    literal = re.compile(r"^\s*(\w*password\w*\s*:|requirepass)\s+(?!\{\{)\S", re.I)
    for path in (p for p in (CHART / "templates").rglob("*") if p.is_file()):
        for line in path.read_text().splitlines():
            assert not literal.search(line), f"{path.name}: {line.strip()}"


def test_redis_reads_its_password_from_the_secret_not_the_command_line() -> None:
    docs = render()
    deployment = named(docs, "Deployment", f"{RELEASE}-cqrs-stack-redis")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    password = generated(docs)["redis"]
    assert password not in yaml.safe_dump(deployment)
    assert container["command"] == ["redis-server", "/etc/redis/redis.conf"]
    conf = secret_data(named(docs, "Secret", f"{RELEASE}-cqrs-stack-redis"))["redis.conf"]
    assert f"requirepass {password}" in conf
    assert "maxmemory-policy noeviction" in conf


def test_network_policy_admits_only_the_stacks_and_the_operator() -> None:
    docs = render(CHART / "examples" / "hardened.yaml")
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    labels = {
        where: doc["spec"]["template"]["metadata"]["labels"]
        for doc in docs
        if doc["kind"] in ("Deployment", "StatefulSet")
        for where in [doc["metadata"]["name"]]
    }
    guarded = {
        name for name, lab in labels.items() if selector_matches(policy["spec"]["podSelector"], lab)
    }
    assert guarded == {f"{RELEASE}-cqrs-stack-postgresql", f"{RELEASE}-cqrs-stack-redis"}

    (rule,) = policy["spec"]["ingress"]
    assert sorted(p["port"] for p in rule["ports"]) == [5432, 6379]

    def admitted(pod_labels: dict[str, str], namespace: str = NAMESPACE) -> bool:
        """A peer without namespaceSelector is of the policy's namespace."""

        def in_namespace(peer: dict[str, Any]) -> bool:
            if "namespaceSelector" not in peer:
                return namespace == policy["metadata"]["namespace"]
            ns_labels = {"kubernetes.io/metadata.name": namespace}
            return selector_matches(peer["namespaceSelector"], ns_labels)

        return any(
            in_namespace(peer) and selector_matches(peer["podSelector"], pod_labels)
            for peer in rule["from"]
        )

    stack = one(docs, "CqrsStack")
    spec = parse_spec(stack["spec"], namespace="shop", name=stack["metadata"]["name"])
    for component in manifests.COMPONENTS:
        assert admitted(manifests.labels(spec, component)), component
    # The migration Job's pods reach the databases too (they run before any other pod).
    job_pod = manifests.migration_job(spec)["spec"]["template"]["metadata"]["labels"]
    assert admitted(job_pod)
    operator_labels = labels[f"{RELEASE}-cqrs-stack-operator"]
    assert admitted(operator_labels, f"{NAMESPACE}-operator")  # in its own namespace
    assert not admitted(operator_labels, "elsewhere")
    assert not admitted({"app": "curl"})
    assert not admitted(labels[f"{RELEASE}-cqrs-stack-redis"])
    assert not admitted(
        {**manifests.labels(spec, "write-api"), "app.kubernetes.io/component": "debug"}
    )
