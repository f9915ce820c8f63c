"""The chart's monitoring: PodMonitor / ServiceMonitor / PrometheusRule where the cluster serves
monitoring.coreos.com/v1 (else skipped, and NOTES.txt says so), and the Grafana dashboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cqrs_operator import manifests
from cqrs_operator.spec import parse_spec
from tests.chart.chart import (
    CHART,
    NAMESPACE,
    Doc,
    named,
    of_kind,
    one,
    render,
    render_error,
    render_notes,
    selector_matches,
)
from tests.chart.test_render import STANDARD_LABELS

MONITORING_API = "monitoring.coreos.com/v1"
MONITORS = ("PodMonitor", "ServiceMonitor", "PrometheusRule")
# What a cluster with the Prometheus Operator's CRDs serves: each kind (helm's capabilities
# list "group/version/Kind" beside "group/version").
SERVED = (MONITORING_API, *(f"{MONITORING_API}/{kind}" for kind in MONITORS))
ALL_ON = (
    "monitoring.podMonitor.enabled=true",
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.grafanaDashboard.enabled=true",
)
ALERTS = {
    "CqrsProjectionLagHigh",
    "CqrsDeadLettersRising",
    "CqrsCatchUpWatermarkStalled",
    "CqrsStackNotReady",
    "CqrsOperatorReconcileErrors",
    "CqrsProjectionBacklogHigh",
    "CqrsProjectorDown",
    "CqrsOperatorDown",
}


def stack_pods(docs: list[Doc]) -> dict[str, Doc]:
    """The pod templates the operator renders for the release's stack, per component."""
    stack = one(docs, "CqrsStack")
    spec = parse_spec(
        stack["spec"], namespace=NAMESPACE, name=stack["metadata"]["name"], uid="u", status={}
    )
    return {
        c: manifests.deployment(spec, c, 1, "digest")["spec"]["template"]
        for c in manifests.COMPONENTS
    }


def port_names(pod: Doc) -> set[str]:
    return {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}


def operator_pod(docs: list[Doc]) -> Doc:
    deployment = named(docs, "Deployment", "cqrs-cqrs-stack-operator")
    pod: Doc = deployment["spec"]["template"]
    return pod


def test_monitors_render_where_the_api_is_served_and_select_stacks_and_operator() -> None:
    docs = render(
        None,
        "monitoring.podMonitor.enabled=true",
        "monitoring.prometheusRule.enabled=true",
        api_versions=SERVED,
    )
    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == MONITORING_API
    assert monitor["spec"]["namespaceSelector"] == {
        "matchNames": [NAMESPACE, f"{NAMESPACE}-operator"]
    }
    selector = monitor["spec"]["selector"]
    for component, pod in stack_pods(docs).items():
        assert selector_matches(selector, pod["metadata"]["labels"]), component
        assert "http" in port_names(pod), component  # the port the endpoint scrapes
    # The migration Job's pods (no port) and the dev databases are not selected.
    labels = {**pod["metadata"]["labels"], "app.kubernetes.io/component": "migrate"}
    assert not selector_matches(selector, labels)
    for deployment in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        expected = pod_labels["app.kubernetes.io/component"] == "operator"
        assert selector_matches(selector, pod_labels) is expected, deployment["metadata"]["name"]
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"http", "metrics"}
    # Each endpoint's port is a named container port of the pods it scrapes.
    assert "metrics" in port_names(operator_pod(docs))
    assert endpoints["metrics"]["honorLabels"] is True  # the operator's own namespace labels
    targets = {r.get("targetLabel") for r in endpoints["http"]["relabelings"]} - {None}
    assert {"stack", "component"} <= targets
    rule = one(docs, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == ALERTS
    assert not of_kind(docs, "ServiceMonitor")


def test_service_monitor_scrapes_the_operator_and_the_pod_monitor_then_does_not() -> None:
    docs = render(None, *ALL_ON, api_versions=SERVED)
    service = named(docs, "Service", "cqrs-cqrs-stack-operator-metrics")
    pod = operator_pod(docs)
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == f"{NAMESPACE}-operator"
    assert selector_matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # The operator is scraped once: not by the PodMonitor as well.
    pod_monitor = one(docs, "PodMonitor")
    assert not selector_matches(pod_monitor["spec"]["selector"], pod["metadata"]["labels"])
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == ["http"]


def test_cluster_wide_pod_monitor_watches_every_namespace() -> None:
    docs = render(
        None,
        "monitoring.podMonitor.enabled=true",
        "rbac.clusterWide=true",
        api_versions=SERVED,
    )
    assert one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


def test_monitors_are_skipped_without_the_api_and_notes_say_why(tmp_path: Path) -> None:
    docs = render(None, *ALL_ON)
    for kind in MONITORS:
        assert not of_kind(docs, kind), kind
    # What needs no CRD is still there.
    named(docs, "Service", "cqrs-cqrs-stack-operator-metrics")
    named(docs, "ConfigMap", "cqrs-cqrs-stack-dashboard")
    notes = render_notes(*ALL_ON, workdir=tmp_path / "without")
    line = next(line for line in notes.splitlines() if line.startswith("Monitoring: skipped"))
    for kind, key in (
        ("PodMonitor", "podMonitor"),
        ("ServiceMonitor", "serviceMonitor"),
        ("PrometheusRule", "prometheusRule"),
    ):
        assert f"{kind} (monitoring.{key}.enabled)" in line
    assert MONITORING_API in notes
    served = render_notes(*ALL_ON, api_versions=SERVED, workdir=tmp_path / "with")
    assert "Monitoring: skipped" not in served
    # Nothing asked for, nothing said.
    assert "Monitoring:" not in render_notes(workdir=tmp_path / "off")


def test_dashboard_configmap_carries_the_sidecar_label_and_valid_json() -> None:
    docs = render(None, "monitoring.grafanaDashboard.enabled=true")
    config_map = named(docs, "ConfigMap", "cqrs-cqrs-stack-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    dashboard = json.loads(config_map["data"]["cqrs-stack.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "cqrs-stack.json").read_text())
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets and all(t["expr"] for t in targets)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])

    docs = render(
        None,
        "monitoring.grafanaDashboard.enabled=true",
        "monitoring.grafanaDashboard.label.key=dashboards",
        "monitoring.grafanaDashboard.label.value=cqrs",
        "monitoring.grafanaDashboard.namespace=grafana",
        "monitoring.grafanaDashboard.annotations.grafana_folder=cqrs-stack",
    )
    config_map = named(docs, "ConfigMap", "cqrs-cqrs-stack-dashboard")
    assert config_map["metadata"]["labels"]["dashboards"] == "cqrs"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["namespace"] == "grafana"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "cqrs-stack"}


def test_nothing_monitoring_renders_by_default() -> None:
    docs = render(None, api_versions=SERVED)
    for kind in MONITORS:
        assert not of_kind(docs, kind), kind
    assert not [
        d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("dashboard")
    ]
    assert not [d for d in of_kind(docs, "Service") if d["metadata"]["name"].endswith("-metrics")]
    container = operator_pod(docs)["spec"]["containers"][0]
    assert "--metrics-port=8081" in container["args"]


def test_alert_thresholds_come_from_the_values() -> None:
    docs = render(
        None,
        "monitoring.prometheusRule.enabled=true",
        "monitoring.prometheusRule.projectionLag.seconds=30",
        "monitoring.prometheusRule.projectionLag.for=2m",
        "monitoring.prometheusRule.alertLabels.team=payments",
        api_versions=SERVED,
    )
    rules = {
        r["alert"]: r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]
    }
    lag = rules["CqrsProjectionLagHigh"]
    assert lag["expr"].endswith("> 30") and lag["for"] == "2m"
    assert all(r["labels"]["team"] == "payments" for r in rules.values())
    # Prometheus templates reach the rule as Prometheus templates, not rendered by Helm.
    assert "{{ $labels.stack }}" in lag["annotations"]["summary"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "monitoring.prometheusRule.projectionLag.for=5 minutes",
            "/monitoring/prometheusRule/projectionLag/for",
        ),
        (
            "monitoring.prometheusRule.projectionLag.seconds=0",
            "/monitoring/prometheusRule/projectionLag/seconds",
        ),
        ("monitoring.podMonitor.interval=often", "/monitoring/podMonitor/interval"),
        ("monitoring.grafanaDashboard.label.key=-bad", "/monitoring/grafanaDashboard/label/key"),
        ("monitoring.surprise=1", "surprise"),
        ("operator.metricsPort=80", "/operator/metricsPort"),
    ],
)
def test_bad_monitoring_values_are_refused_naming_the_field(value: str, expected: str) -> None:
    assert expected in render_error(value)


def test_metrics_and_liveness_ports_must_differ() -> None:
    error = render_error("operator.metricsPort=8080")
    assert "operator.metricsPort and operator.livenessPort" in error


def test_monitoring_objects_carry_the_standard_labels() -> None:
    docs = render(None, *ALL_ON, api_versions=SERVED)
    objects = [d for kind in MONITORS for d in of_kind(docs, kind)]
    objects += [named(docs, "ConfigMap", "cqrs-cqrs-stack-dashboard")]
    objects += [named(docs, "Service", "cqrs-cqrs-stack-operator-metrics")]
    assert len(objects) == 5
    for doc in objects:
        missing = [k for k in STANDARD_LABELS if k not in doc["metadata"]["labels"]]
        assert not missing, (doc["kind"], missing)


def leaf_paths(values: dict[str, object], prefix: str) -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}.{key}"
        out += leaf_paths(value, path) if isinstance(value, dict) and value else [path]
    return out


def test_the_chart_readme_documents_every_monitoring_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows = [line for line in (CHART / "README.md").read_text().splitlines() if line.startswith("|")]
    undocumented = []
    for path in [*leaf_paths(values["monitoring"], "monitoring"), "operator.metricsPort"]:
        section, last = ".".join(path.split(".")[:2]), path.split(".")[-1]
        if not any(
            f"`{path}`" in row or (f"`{section}." in row and f".{last}`" in row) for row in rows
        ):
            undocumented.append(path)
    assert not undocumented
