"""The operator's /metrics (``--metrics-port``): reconcile durations and errors, stacks by phase
and each stack's Ready, kept right as stacks are created, change phase, are deleted, and
across an operator restart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from cqrs_stack.localservers import free_port
from tests.operator.fixtures_operator import Operator, Stacks, stack_manifest, wait_until

Samples = dict[str, list[tuple[dict[str, str], float]]]
PHASES = ("Provisioning", "Ready", "Degraded", "Failed", "Deleting")


def start_with_metrics(
    operator_factory: Callable[..., Operator], kubeconfig: Any, namespace: str
) -> tuple[Operator, str]:
    """An operator serving its metrics on a free loopback port; (operator, metrics URL)."""
    port = free_port()
    operator = operator_factory(
        kubeconfig, namespace, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"
    )
    return operator, f"http://127.0.0.1:{port}/metrics"


async def scrape(url: str) -> Samples | None:
    """Every sample of the operator's /metrics by name, or None while it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            answer = await http.get(url)
    except httpx.HTTPError:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    for found, number in samples.get(name, []):
        if found == labels:
            return number
    return None


def phases(samples: Samples) -> dict[str, float]:
    return {p: value(samples, "cqrs_operator_stacks", phase=p) or 0 for p in PHASES}


async def wait_metrics(
    url: str, operator: Operator, what: str, check: Callable[[Samples], bool]
) -> Samples:
    async def holds() -> Samples | None:
        samples = await scrape(url)
        return samples if samples is not None and check(samples) else None

    result: Samples = await wait_until(
        holds, timeout=60, what=what, alive=operator.exit_reason, interval=0.3
    )
    return result


async def test_stack_metrics_follow_create_phase_delete_and_a_restart(
    kube_apiserver: Any,
    namespace: str,
    stacks: Stacks,
    operator_factory: Callable[..., Operator],
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    operator, url = start_with_metrics(operator_factory, kube_apiserver.kubeconfig, namespace)
    empty = await wait_metrics(url, operator, "metrics served", lambda s: True)
    # Every phase is exported from the start, 0 included; no stack yet.
    assert phases(empty) == dict.fromkeys(PHASES, 0)
    assert "cqrs_operator_stack_ready" not in empty
    assert value(empty, "cqrs_operator_reconcile_seconds_count") == 0

    await stacks.create(stack_manifest("good", fresh_names, write_pg, read_pg, redis_server.url))
    broken = stack_manifest("broken", f"{fresh_names}b", write_pg, read_pg, redis_server.url)
    broken["spec"]["databases"]["write"]["port"] = free_port()  # nothing listens there
    await stacks.create(broken)
    await stacks.wait_ready("good", operator)

    def settled(s: Samples) -> bool:
        return (
            phases(s) == {**dict.fromkeys(PHASES, 0), "Ready": 1, "Degraded": 1}
            and value(s, "cqrs_operator_stack_ready", namespace=namespace, stack="good") == 1
            and value(s, "cqrs_operator_stack_ready", namespace=namespace, stack="broken") == 0
        )

    samples = await wait_metrics(url, operator, "one stack Ready, one Degraded", settled)
    # The broken stack's reconciles failed, each counted with its reason; each was timed.
    errors = value(samples, "cqrs_operator_reconcile_errors_total", reason="DatabaseUnreachable")
    assert errors is not None and errors >= 1
    timed = value(samples, "cqrs_operator_reconcile_seconds_count")
    assert timed is not None and timed >= 2
    assert value(samples, "cqrs_operator_reconcile_errors_total", reason="InvalidSpec") is None

    # A new operator reports the same from its first listing of the stacks.
    operator.stop()
    operator, url = start_with_metrics(operator_factory, kube_apiserver.kubeconfig, namespace)
    await wait_metrics(url, operator, "the same figures after a restart", settled)

    # A deleted stack leaves both metrics.
    await stacks.delete("broken")
    await stacks.wait_gone("broken", operator)

    def gone(s: Samples) -> bool:
        return (
            phases(s) == {**dict.fromkeys(PHASES, 0), "Ready": 1}
            and value(s, "cqrs_operator_stack_ready", namespace=namespace, stack="broken") is None
        )

    await wait_metrics(url, operator, "the deleted stack gone from the metrics", gone)


async def test_stack_lag_is_exported_by_the_operator_while_no_projector_runs(
    kube_apiserver: Any,
    namespace: str,
    stacks: Stacks,
    operator_factory: Callable[..., Operator],
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    """No projector runs here (no kubelet): the backlog added to the stream is what the
    operator reads from Redis and exports, the signal that survives a stopped projector."""
    operator, url = start_with_metrics(operator_factory, kube_apiserver.kubeconfig, namespace)
    await stacks.create(stack_manifest("lagging", fresh_names, write_pg, read_pg, redis_server.url))
    await stacks.wait_ready("lagging", operator)

    def lag_is(events: int) -> Callable[[Samples], bool]:
        def check(s: Samples) -> bool:
            found = value(s, "cqrs_operator_stack_lag_events", namespace=namespace, stack="lagging")
            return found == events

        return check

    await wait_metrics(url, operator, "a lag of 0 once the stream exists", lag_is(0))
    redis = Redis.from_url(redis_server.url)
    try:
        for i in range(7):
            await redis.xadd(
                f"{namespace}.lagging-events", {"type": "RecordCreated", "position": str(i + 1)}
            )
        await wait_metrics(url, operator, "the 7 undelivered entries", lag_is(7))
    finally:
        await redis.aclose()
    await stacks.delete("lagging")
    await stacks.wait_gone("lagging", operator)
    await wait_metrics(
        url,
        operator,
        "the deleted stack's lag gone",
        lambda s: (
            value(s, "cqrs_operator_stack_lag_events", namespace=namespace, stack="lagging") is None
        ),
    )


async def test_a_metrics_port_in_use_is_refused_with_a_clear_error(
    kube_apiserver: Any,
    namespace: str,
    operator_factory: Callable[..., Operator],
) -> None:
    first, url = start_with_metrics(operator_factory, kube_apiserver.kubeconfig, namespace)
    await wait_metrics(url, first, "metrics served", lambda s: True)
    port = url.split(":")[2].split("/")[0]
    second = operator_factory(
        kube_apiserver.kubeconfig, namespace, "--metrics-port", port, "--metrics-host", "127.0.0.1"
    )
    assert second.process is not None
    assert second.process.wait(30) == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in second.log_text()
