"""Every metric the chart's alerts and dashboard read is exported by the real processes.

A real stack (write API, read API, projector against real PostgreSQL and Redis) and a real
operator (against the fixture API server) are scraped; each metric name in the
PrometheusRule's expressions and the dashboard's queries must be among what they export, and
each equality matcher on a label the services set (``route="/write"``) must match a sample.
An alert on a name nobody exports would never fire: that is what this test refuses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cqrs_stack.localservers import free_port
from tests.chart.chart import CHART, one, render
from tests.chart.promql import exported_names, metric_names, selectors, unexported, unmatched
from tests.fixtures.stack import Stack
from tests.operator.fixtures_operator import Operator, wait_until

MONITORING_API = "monitoring.coreos.com/v1/PrometheusRule"
# Labels the scrape adds (the PodMonitor's relabelings, Prometheus's own): not the services'.
TARGET_LABELS = {"namespace", "stack", "component", "pod", "job", "instance", "container"}
# Series Prometheus writes itself for every target (a scrape's outcome), read by the alerts on
# a projector or an operator that is not up.
SCRAPE_SERIES = {"up"}
# The projector's gauges that alerting needs (services/cqrs_stack/metrics.py).
PROJECTOR_GAUGES = {
    "cqrs_projection_lag_events",
    "cqrs_projection_lag_seconds",
    "cqrs_projection_oldest_pending_seconds",
    "cqrs_dead_letters",
    "cqrs_oldest_dead_letter_seconds",
    "cqrs_catchup_watermark_age_seconds",
}


def rule_exprs() -> list[str]:
    """The expression of every alert the chart renders (all monitoring on, the API served)."""
    docs = render(None, "monitoring.prometheusRule.enabled=true", api_versions=(MONITORING_API,))
    rule = one(docs, "PrometheusRule")
    return [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]


def dashboard_exprs() -> list[str]:
    """Every panel query and variable query of the dashboard the chart ships."""
    dashboard = json.loads((CHART / "dashboards" / "cqrs-stack.json").read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels") or [])

    exprs = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets") or []]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


async def scrape(url: str) -> tuple[set[str], dict[str, list[dict[str, str]]]] | None:
    """(names exported, labels of each sample by name) of one /metrics, or None while it
    does not answer."""
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            answer = await http.get(url)
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    families = list(text_string_to_metric_families(answer.text))
    names = exported_names((f.name, f.type, [s.name for s in f.samples]) for f in families)
    samples: dict[str, list[dict[str, str]]] = {}
    for family in families:
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return names, samples


async def test_alerts_and_dashboard_read_only_metrics_the_services_export(
    stack: Stack,
    kube_apiserver: Any,
    namespace: str,
    operator_factory: Callable[..., Operator],
) -> None:
    port = free_port()
    operator = operator_factory(
        kube_apiserver.kubeconfig,
        namespace,
        "--metrics-port",
        str(port),
        "--metrics-host",
        "127.0.0.1",
    )
    processes = [await stack.launch(role) for role in ("write-api", "read-api", "projector")]
    write_api, read_api = processes[0], processes[1]
    # One answered write and read, so that the labelled series the rules filter on exist.
    async with httpx.AsyncClient(timeout=10) as http:
        written = await http.post(f"{write_api.url}/write", json={"key": "k", "value": "v"})
        assert written.status_code == 200, written.text
        position = written.json()["position"]
        read = await http.get(f"{read_api.url}/read/k", params={"position": position})
        assert read.json()["success"] is True, read.text

    exported: set[str] = set()
    samples: dict[str, list[dict[str, str]]] = {}
    urls = [f"{p.url}/metrics" for p in processes]
    for url in urls:
        scraped = await scrape(url)
        assert scraped is not None, url
        exported |= scraped[0]
        for name, labels in scraped[1].items():
            samples.setdefault(name, []).extend(labels)
    operator_url = f"http://127.0.0.1:{port}/metrics"
    from_operator = await wait_until(
        lambda: scrape(operator_url),
        timeout=30,
        what="the operator's /metrics",
        alive=operator.exit_reason,
    )
    exported |= from_operator[0] | SCRAPE_SERIES

    exprs = rule_exprs() + dashboard_exprs()
    assert len(exprs) > 20
    read_names = set().union(*(metric_names(e) for e in exprs))
    # What the issue asks alerting to read is read, and exported.
    assert PROJECTOR_GAUGES <= read_names
    assert {
        "cqrs_operator_stack_ready",
        "cqrs_operator_reconcile_errors_total",
        "cqrs_operator_stack_lag_events",
        "up",
    } <= read_names
    missing = unexported(exprs, exported)
    assert not missing, (
        f"expressions reading metrics nobody exports: {missing}; exported: {sorted(exported)}"
    )
    assert not unmatched(exprs, samples, TARGET_LABELS)

    # The check has teeth: a rule on a name nobody exports, or a label value no sample has.
    bogus = "rate(cqrs_no_such_metric_total[5m]) > 0"
    assert unexported([*exprs, bogus], exported) == {bogus: {"cqrs_no_such_metric_total"}}
    typo = 'rate(cqrs_http_requests_total{route="/writes"}[5m])'
    assert unmatched([typo], samples, TARGET_LABELS)


def test_the_scanner_reads_every_metric_name_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route)"
        ' (rate(a_seconds_bucket{route="/read/{key:key}", stack=~"$stack"}[$__rate_interval])))'
        " > 1e3 and on (namespace, stack) max without (pod)"
        " (b_total offset 5m) / ignoring (x) group_left (y) c unless absent(d) or e > bool 2"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d", "e"}
    assert metric_names('label_values(f{namespace="$namespace"}, stack)') == {"f"}
    assert metric_names("label_values(namespace)") == set()
    assert next(selectors(expr)) == ("a_seconds_bucket", {"route": "/read/{key:key}"})
