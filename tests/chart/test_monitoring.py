"""The chart's monitoring: PodMonitor / ServiceMonitor / PrometheusRule where the cluster serves
monitoring.coreos.com/v1 (else skipped, and NOTES.txt says so), and the Grafana dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cqrs_operator import manifests
from cqrs_operator.spec import parse_spec
from tests.chart.chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    Doc,
    helm,
    named,
    of_kind,
    one,
    render,
    render_error,
    render_notes,
    selector_matches,
    template_args,
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


def rules_of(docs: list[Doc]) -> dict[str, Doc]:
    return {
        r["alert"]: r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]
    }


def test_each_monitoring_kind_is_checked_on_its_own(tmp_path: Path) -> None:
    """A cluster serving monitoring.coreos.com/v1 with only the ServiceMonitor CRD: only the
    ServiceMonitor is rendered (the others would fail the install), NOTES names the others."""
    partial = (MONITORING_API, f"{MONITORING_API}/ServiceMonitor")
    docs = render(None, *ALL_ON, api_versions=partial)
    assert one(docs, "ServiceMonitor")
    assert not of_kind(docs, "PodMonitor") and not of_kind(docs, "PrometheusRule")
    notes = render_notes(*ALL_ON, api_versions=partial, workdir=tmp_path / "partial")
    line = next(line for line in notes.splitlines() if line.startswith("Monitoring: skipped"))
    assert "PodMonitor (monitoring.podMonitor.enabled)" in line
    assert "PrometheusRule (monitoring.prometheusRule.enabled)" in line
    assert "ServiceMonitor" not in line
    # Only the PodMonitor's CRD: it scrapes the operator too (no ServiceMonitor will).
    docs = render(None, *ALL_ON, api_versions=(MONITORING_API, f"{MONITORING_API}/PodMonitor"))
    endpoints = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == ["http", "metrics"]
    assert not of_kind(docs, "ServiceMonitor")


PROJECTOR_FIGURES = (
    "cqrs_projection_lag_seconds",
    "cqrs_projection_lag_events",
    "cqrs_catchup_watermark_age_seconds",
    "cqrs_dead_letters_total",
)


def test_projector_figures_are_read_from_the_projector_only_and_its_absence_alerts() -> None:
    """The APIs export the projector's gauge names at 0: a rule aggregating over every
    component reads 0 while the projector is stopped. Each projector figure is filtered to
    component="projector", and a stack without a projector up has its own alert."""
    rules = rules_of(render(None, "monitoring.prometheusRule.enabled=true", api_versions=SERVED))
    for name, rule in rules.items():
        for figure in PROJECTOR_FIGURES:
            if figure in rule["expr"]:
                assert f'{figure}{{component="projector"' in rule["expr"], (name, figure)
    down = rules["CqrsProjectorDown"]["expr"]
    assert 'up{component="projector"} == 1' in down and "unless on (namespace, stack)" in down
    assert 'up{component="write-api"}' in down and "cqrs_operator_stack_ready" in down
    # The operator's reading of the backlog keeps the backlog alert alive without a projector.
    backlog = rules["CqrsProjectionBacklogHigh"]["expr"]
    assert "cqrs_operator_stack_lag_events" in backlog and backlog.rstrip().endswith("> 1000")
    operator_down = rules["CqrsOperatorDown"]["expr"]
    assert operator_down.startswith('absent(up{component="operator", namespace="shop-operator"')
    assert rules["CqrsOperatorDown"]["for"] == "5m"


def test_dead_letters_alert_on_the_counter_restart_safe_with_a_for() -> None:
    """The gauge of the dead-letter stream restarts at 0 with the projector and drops when
    entries are removed: the alert reads the counter of moves, through increase()."""
    rules = rules_of(
        render(
            None,
            "monitoring.prometheusRule.enabled=true",
            "monitoring.prometheusRule.deadLetters.window=30m",
            "monitoring.prometheusRule.deadLetters.for=2m",
            api_versions=SERVED,
        )
    )
    rule = rules["CqrsDeadLettersRising"]
    assert rule["expr"] == (
        "sum by (namespace, stack) "
        '(increase(cqrs_dead_letters_total{component="projector"}[30m])) > 0'
    )
    assert rule["for"] == "2m"
    assert not any("delta(" in r["expr"] for r in rules.values())


DURATION_FIELDS = (
    "monitoring.prometheusRule.projectionLag.for",
    "monitoring.prometheusRule.deadLetters.window",
    "monitoring.prometheusRule.deadLetters.for",
    "monitoring.prometheusRule.catchUpStalled.writesWindow",
    "monitoring.prometheusRule.projectionBacklog.for",
    "monitoring.prometheusRule.operatorDown.for",
    "monitoring.podMonitor.interval",
    "monitoring.serviceMonitor.interval",
)


@pytest.mark.parametrize("field", DURATION_FIELDS)
@pytest.mark.parametrize("duration", ["30s1m", "5m5m", "1m1h", "0s", "0m", "1h0m", "5", "1.5m"])
def test_durations_prometheus_refuses_are_refused_by_the_schema(field: str, duration: str) -> None:
    """Prometheus' grammar: units in the order y w d h m s ms, each at most once (and none 0,
    which no window or wait means)."""
    assert "/" + field.replace(".", "/") in render_error(f"{field}={duration}")


@pytest.mark.parametrize("duration", ["1y2w3d4h5m6s7ms", "1h30m", "90s", "500ms", "15m", "2d"])
def test_durations_in_prometheus_grammar_are_accepted(duration: str) -> None:
    docs = render(
        None,
        "monitoring.prometheusRule.enabled=true",
        "monitoring.podMonitor.enabled=true",
        *(f"{field}={duration}" for field in DURATION_FIELDS),
        api_versions=SERVED,
    )
    assert rules_of(docs)["CqrsProjectionLagHigh"]["for"] == duration
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["interval"] == duration
    assert render(None, "monitoring.podMonitor.interval=", api_versions=SERVED)


def relabel_keeps(relabelings: list[Doc], pod_labels: dict[str, str]) -> bool:
    """Whether Prometheus' `keep` relabelings keep a target of a pod with these labels (each
    source label read from __meta_kubernetes_pod_label_*, joined with ';', the regex anchored)."""
    prefix = "__meta_kubernetes_pod_label_"
    meta = {prefix + k.replace(".", "_").replace("/", "_"): v for k, v in pod_labels.items()}
    for rule in relabelings:
        if rule.get("action") != "keep":
            continue
        joined = ";".join(meta.get(label, "") for label in rule["sourceLabels"])
        if not re.fullmatch(rule.get("regex", "(.*)"), joined):
            return False
    return True


def test_releases_sharing_the_operator_namespace_scrape_only_their_own_operator() -> None:
    shared = "operator.namespace=cqrs-system"
    operators: dict[str, dict[str, str]] = {}
    monitors: dict[str, Doc] = {}
    for release, namespace in (("ra", "a"), ("rb", "b")):
        docs = render(
            None,
            "monitoring.podMonitor.enabled=true",
            shared,
            release=release,
            namespace=namespace,
            api_versions=SERVED,
        )
        deployment = named(docs, "Deployment", f"{release}-cqrs-stack-operator")
        operators[release] = deployment["spec"]["template"]["metadata"]["labels"]
        monitors[release] = one(docs, "PodMonitor")
    for release, monitor in monitors.items():
        assert "cqrs-system" in monitor["spec"]["namespaceSelector"]["matchNames"]
        by_port = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
        for other, labels in operators.items():
            assert selector_matches(monitor["spec"]["selector"], labels)
            kept = relabel_keeps(by_port["metrics"]["relabelings"], labels)
            assert kept == (other == release), (release, other)
            # Nor through the stacks' endpoint, should the operator serve a port "http".
            assert not relabel_keeps(by_port["http"]["relabelings"], labels)
    for component in ("write-api", "read-api", "projector"):
        pod = {"app.kubernetes.io/component": component, "app.kubernetes.io/instance": "orders"}
        assert relabel_keeps(by_port["http"]["relabelings"], pod)
        assert not relabel_keeps(by_port["metrics"]["relabelings"], pod)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping naming a key twice (PyYAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[object, object]:
    keys = [loader.construct_object(k) for k, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    assert not duplicates, f"duplicate keys {duplicates} at {node.start_mark}"
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _unique_mapping,  # type: ignore[arg-type]
)


def test_extra_labels_naming_chart_labels_are_merged_not_duplicated() -> None:
    """The chart's labels win on its objects; each alert's own severity wins over
    alertLabels.severity; a dashboard label key the chart sets is refused."""
    sets = (
        *ALL_ON,
        "monitoring.prometheusRule.alertLabels.severity=page",
        "monitoring.prometheusRule.alertLabels.team=payments",
        "monitoring.podMonitor.labels.app\\.kubernetes\\.io/component=scraper",
        "monitoring.podMonitor.labels.release=kube-prometheus-stack",
        "monitoring.serviceMonitor.labels.app\\.kubernetes\\.io/instance=other",
        "monitoring.prometheusRule.labels.app\\.kubernetes\\.io/name=other",
    )
    out = helm(*template_args(None, *sets, api_versions=SERVED)).stdout
    docs = [d for d in yaml.load_all(out, Loader=_UniqueKeyLoader) if d]
    rules = rules_of(docs)
    assert rules["CqrsProjectionLagHigh"]["labels"] == {"severity": "warning", "team": "payments"}
    assert rules["CqrsProjectorDown"]["labels"]["severity"] == "critical"
    pod_monitor = one(docs, "PodMonitor")["metadata"]["labels"]
    assert pod_monitor["app.kubernetes.io/component"] == "monitoring"
    assert pod_monitor["release"] == "kube-prometheus-stack"
    assert (
        one(docs, "ServiceMonitor")["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    )
    assert (
        one(docs, "PrometheusRule")["metadata"]["labels"]["app.kubernetes.io/name"] == "cqrs-stack"
    )
    error = render_error(
        "monitoring.grafanaDashboard.enabled=true",
        "monitoring.grafanaDashboard.label.key=app.kubernetes.io/name",
    )
    assert "monitoring.grafanaDashboard.label.key app.kubernetes.io/name" in error
