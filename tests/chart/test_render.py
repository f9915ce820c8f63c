"""``helm lint`` and ``helm template`` of the default values and every example values file.

What the chart renders is checked against what the operator expects: the release's CqrsStack
is parsed by the operator's own spec parser, the Ingress routes to the Services the operator
renders, and the operator's RBAC is the exact one the operator tests run under.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from cqrs_operator import manifests
from cqrs_operator.spec import StackSpec, parse_spec
from tests.chart.chart import (
    CHART,
    EXAMPLES,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUES_FILES,
    Doc,
    helm,
    named,
    of_kind,
    one,
    render,
    secret_data,
    template_args,
    values_id,
)
from tests.operator.fixtures_operator import RELEASE as RBAC_RELEASE
from tests.operator.fixtures_operator import render_operator_rbac

STANDARD_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
)
values_files = pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "dev.yaml",
        "external-databases.yaml",
        "cluster-wide.yaml",
        "ingress.yaml",
        "hardened.yaml",
    } <= names


@values_files
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_is_clean(values_file: Path | None, strict: bool) -> None:
    args = ["lint", str(CHART), "--namespace", NAMESPACE]
    if strict:
        args.append("--strict")
    if values_file is not None:
        args += ["--values", str(values_file)]
    done = helm(*args)
    assert "0 chart(s) failed" in done.stdout
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


def test_chart_versions_are_in_step_with_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == project["version"]
    assert chart["appVersion"] == project["version"]


@values_files
def test_every_object_has_the_standard_labels(values_file: Path | None) -> None:
    docs = render(values_file)
    assert docs
    for doc in docs:
        labels = doc["metadata"].get("labels") or {}
        missing = [key for key in STANDARD_LABELS if key not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert len(doc["metadata"]["name"]) <= 63


@values_files
def test_namespaced_objects_name_their_namespace(values_file: Path | None) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "Namespace"}
    for doc in render(values_file):
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace"), f"{doc['kind']}/{doc['metadata']['name']}"


def test_default_values_install_operator_stack_and_dev_databases() -> None:
    docs = render()
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",  # the CRD, for the operator to apply at start (operator.manageCrd)
        "CqrsStack",
        "Deployment",
        "Namespace",
        "Pod",  # the `helm test` hook
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    assert deployments == {f"{RELEASE}-cqrs-stack-operator", f"{RELEASE}-cqrs-stack-redis"}
    assert one(docs, "StatefulSet")["metadata"]["name"] == f"{RELEASE}-cqrs-stack-postgresql"
    assert one(docs, "CqrsStack")["metadata"]["name"] == RELEASE
    # The operator lives in a namespace of its own: deleting the stacks' namespace leaves it
    # running to finalize them.
    operator_ns = f"{NAMESPACE}-operator"
    assert one(docs, "Namespace")["metadata"]["name"] == operator_ns
    operator = named(docs, "Deployment", f"{RELEASE}-cqrs-stack-operator")
    assert operator["metadata"]["namespace"] == operator_ns
    assert one(docs, "CqrsStack")["metadata"]["namespace"] == NAMESPACE
    same = render(None, f"operator.namespace={NAMESPACE}")
    assert not of_kind(same, "Namespace")
    assert (
        named(same, "Deployment", f"{RELEASE}-cqrs-stack-operator")["metadata"]["namespace"]
        == NAMESPACE
    )


def test_operator_image_and_arguments() -> None:
    docs = render()
    operator = named(docs, "Deployment", f"{RELEASE}-cqrs-stack-operator")
    # Two replicas that elect a leader: a rolling update never leaves none running.
    assert operator["spec"]["replicas"] == 2
    assert operator["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    container = operator["spec"]["template"]["spec"]["containers"][0]
    lease = f"--leader-election-id={RELEASE}-cqrs-stack-operator"
    for arg in ("--leader-elect", lease, "--lease-duration=15", "--renew-deadline=10"):
        assert arg in container["args"]
    assert "--retry-period=2" in container["args"]
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert container["image"] == "cqrs-stack-operator:0.1.0"
    assert container["args"][0] == f"--namespace={NAMESPACE}"
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}

    # Timings that could let two leaders overlap are refused at install, as at the start.
    for sets, said in [
        (("operator.leaderElection.renewDeadline=15",), "must be shorter than leaseDuration"),
        (("operator.leaderElection.retryPeriod=9",), "leaves no room for a retry"),
    ]:
        refused = helm(*template_args(None, *sets), check=False)
        assert refused.returncode != 0 and said in refused.stderr, refused.stderr

    watched = render(None, "operator.watchNamespaces={shop,billing}")
    args = named(watched, "Deployment", f"{RELEASE}-cqrs-stack-operator")["spec"]["template"][
        "spec"
    ]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=shop",
        "--namespace=billing",
    ]

    wide = render(None, "rbac.clusterWide=true", "operator.image.tag=dev")
    container = named(wide, "Deployment", f"{RELEASE}-cqrs-stack-operator")["spec"]["template"][
        "spec"
    ]["containers"][0]
    assert "--all-namespaces" in container["args"]
    assert not any(a.startswith("--namespace") for a in container["args"])
    assert container["image"] == "cqrs-stack-operator:dev"


@pytest.mark.parametrize(
    "sets",
    [(), ("rbac.clusterWide=true",), ("operator.watchNamespaces={a,b}",)],
    ids=["namespaced", "cluster-wide", "watch-namespaces"],
)
def test_operator_rbac_is_the_one_the_operator_tests_run_under(sets: tuple[str, ...]) -> None:
    """The full chart ships exactly the ServiceAccount and RBAC tests/operator applies."""
    tested = render_operator_rbac("ops", *sets)
    shipped = [
        d
        for d in render(None, *sets, release=RBAC_RELEASE, namespace="ops")
        if d["kind"]
        in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    key = lambda d: (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])  # noqa: E731
    assert sorted(shipped, key=key) == sorted(tested, key=key)
    operator = named(
        render(None, *sets, release=RBAC_RELEASE, namespace="ops"),
        "Deployment",
        f"{RBAC_RELEASE}-cqrs-stack-operator",
    )
    account = next(d for d in tested if d["kind"] == "ServiceAccount")["metadata"]["name"]
    assert operator["spec"]["template"]["spec"]["serviceAccountName"] == account


def stack_spec_of(docs: list[Doc]) -> tuple[Doc, StackSpec]:
    stack = one(docs, "CqrsStack")
    meta = stack["metadata"]
    return stack, parse_spec(stack["spec"], namespace=meta["namespace"], name=meta["name"])


@values_files
def test_the_operator_accepts_the_release_stack(values_file: Path | None) -> None:
    docs = render(values_file)
    if not of_kind(docs, "CqrsStack"):
        values = yaml.safe_load(values_file.read_text()) if values_file else {}
        assert values.get("stack", {}).get("enabled") is False
        return
    stack, spec = stack_spec_of(docs)
    assert spec.image_tag == "0.1.0" or values_file is not None
    dev = bool(of_kind(docs, "StatefulSet"))
    if dev:
        # The stack provisions on the dev PostgreSQL with its generated admin Secret...
        pg_service = f"{RELEASE}-cqrs-stack-postgresql"
        for db in (spec.write_db, spec.read_db):
            assert db.host == f"{pg_service}.{NAMESPACE}.svc"
            admin = secret_data(named(docs, "Secret", db.admin_secret))
            assert set(admin) == {"username", "password"}
        named(docs, "Service", pg_service)
        # ...and streams through the dev Redis, whose URL (with the password) is in a Secret.
        ref = stack["spec"]["redis"]["urlSecret"]
        url = secret_data(named(docs, "Secret", ref["name"]))[ref["key"]]
        redis = secret_data(named(docs, "Secret", ref["name"]))
        assert (
            url == f"redis://:{redis['password']}@{RELEASE}-cqrs-stack-redis.{NAMESPACE}.svc:6379/0"
        )


def test_external_databases_point_the_stack_elsewhere() -> None:
    docs = render(CHART / "examples" / "external-databases.yaml")
    assert not of_kind(docs, "StatefulSet") and not of_kind(docs, "Secret")
    _, spec = stack_spec_of(docs)
    assert spec.write_db.host == "pg-write.db.svc" and spec.write_db.admin_secret == "pg-admin"
    assert spec.redis_url_secret is not None and spec.redis_url_secret.name == "redis"


def test_ingress_routes_to_the_services_the_operator_renders() -> None:
    docs = render(CHART / "examples" / "ingress.yaml")
    _, spec = stack_spec_of(docs)
    services = {
        svc["metadata"]["name"]: {p["name"] for p in svc["spec"]["ports"]}
        for svc in (manifests.service(spec, c) for c in manifests.SERVED_COMPONENTS)
    }
    ingress = one(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["hosts"] == ["cqrs.example.com"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "cqrs.example.com"
    routes = {}
    for path in rule["http"]["paths"]:
        backend = path["backend"]["service"]
        assert backend["port"]["name"] in services[backend["name"]]
        routes[path["path"]] = backend["name"]
    assert routes == {
        "/write": f"{RELEASE}-write-api",
        "/read": f"{RELEASE}-read-api",
        "/stats": f"{RELEASE}-read-api",
    }


def test_no_ingress_network_policy_by_default() -> None:
    kinds = {d["kind"] for d in render()}
    assert "Ingress" not in kinds and "NetworkPolicy" not in kinds


def test_pod_controls_and_autoscaling_values_reach_the_operators_deployments() -> None:
    """The chart hands the stack values to the spec key for key: what the operator renders
    from the release's CqrsStack carries them."""
    docs = render(
        None,
        "stack.writeApi.nodeSelector.pool=cqrs",
        "stack.writeApi.priorityClassName=cqrs-high",
        "stack.writeApi.imagePullSecrets[0].name=regcred",
        "stack.writeApi.autoscaling.enabled=true",
        "stack.readApi.tolerations[0].key=dedicated",
        "stack.readApi.tolerations[0].operator=Exists",
        "stack.projector.envFrom[0].configMapRef.name=extra",
        "stack.readModels[0].name=records",
        "stack.readModels[1].name=history",
        "stack.readModels[1].version=2",
        "stack.databases.pool.maxSize=4",
    )
    stack = one(docs, "CqrsStack")
    spec = parse_spec(stack["spec"], namespace=NAMESPACE, name=stack["metadata"]["name"])
    assert spec.read_models == ("records", "history")
    assert spec.model_versions == (("records", 1), ("history", 2))
    assert manifests.config_data(spec)["DB_POOL_MAX_SIZE"] == "4"
    objs = {
        (o["kind"], o["metadata"]["name"].removeprefix(f"{spec.name}-")): o
        for o in manifests.workloads(spec, "d", 1) + manifests.autoscalers(spec, "redis://r:1/0")
    }
    write = objs[("Deployment", "write-api")]
    assert "replicas" not in write["spec"]  # the HPA's
    assert ("HorizontalPodAutoscaler", "write-api") in objs
    pod = write["spec"]["template"]["spec"]
    assert (pod["nodeSelector"], pod["priorityClassName"]) == ({"pool": "cqrs"}, "cqrs-high")
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    read = objs[("Deployment", "read-api")]["spec"]["template"]["spec"]
    assert read["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    projector = objs[("Deployment", "projector")]["spec"]["template"]["spec"]
    assert projector["containers"][0]["envFrom"][0]["configMapRef"]["name"] == "extra"


def test_tracing_values_reach_the_operators_deployments(tmp_path: Path) -> None:
    """stack.tracing is the spec's tracing: the operator renders it into every workload, and
    the default values render none of it. (A values file: --set keeps 0.05 a string.)"""
    endpoint = "http://otel-collector.observability:4318"
    values = tmp_path / "tracing.yaml"
    tracing = {"enabled": True, "endpoint": endpoint, "sampleRatio": 0.05}
    values.write_text(yaml.safe_dump({"stack": {"tracing": tracing}}))
    docs = render(values)
    stack = one(docs, "CqrsStack")
    spec = parse_spec(stack["spec"], namespace=NAMESPACE, name=stack["metadata"]["name"])
    assert (spec.tracing.enabled, spec.tracing.endpoint) == (True, endpoint)
    for component in manifests.COMPONENTS:
        env = {e["name"]: e.get("value") for e in manifests.tracing_env(spec, component)}
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.05"
    (_, default) = stack_spec_of(render(None))
    assert default.tracing.enabled is False
    assert manifests.tracing_env(default, "write-api") == []


def test_the_operator_gets_the_charts_crd_and_may_patch_only_that_one() -> None:
    docs = render()
    crd = yaml.safe_load((CHART / "crds" / "cqrsstacks.cqrs.dev.yaml").read_text())
    config = named(docs, "ConfigMap", f"{RELEASE}-cqrs-stack-operator-crd")
    assert yaml.safe_load(config["data"]["cqrsstacks.cqrs.dev.yaml"]) == crd
    role = named(docs, "ClusterRole", f"{NAMESPACE}-{RELEASE}-cqrs-stack-operator-crd")
    assert role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "resourceNames": [crd["metadata"]["name"]],
            "verbs": ["get", "patch"],
        }
    ]
    operator = named(docs, "Deployment", f"{RELEASE}-cqrs-stack-operator")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert "--crd=/etc/cqrs-stack-operator/crd/cqrsstacks.cqrs.dev.yaml" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert env["CQRS_OPERATOR_IMAGE_TAG"] == str(chart["appVersion"])
    off = render(None, "operator.manageCrd=false")
    assert not [d for d in off if d["metadata"]["name"].endswith("-operator-crd")]
    container = named(off, "Deployment", f"{RELEASE}-cqrs-stack-operator")["spec"]["template"]
    assert not any(a.startswith("--crd") for a in container["spec"]["containers"][0]["args"])
    # The release's stack pins no tag: it runs the operator's version.
    assert "tag" not in one(docs, "CqrsStack")["spec"]["image"]
