"""The operator's /metrics (``--metrics-port``): reconcile durations and errors, stacks by phase
and each stack's Ready, kept right as stacks are created, change phase, are deleted, and
across an operator restart."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from cqrs_stack.localservers import free_port
from tests.operator.fixtures_operator import Operator, World, wait_until

Samples = dict[str, list[tuple[dict[str, str], float]]]
PHASES = ("Provisioning", "Ready", "Degraded", "Failed", "Deleting")
START_ATTEMPTS = 3
# Seconds an operator may take to serve /metrics after its start (imports on a loaded machine).
STARTUP_TIMEOUT = 60.0


async def start_with_metrics(world: World) -> tuple[Operator, str]:
    """An operator serving its metrics on a free loopback port, returned once it answers a
    scrape; (operator, metrics URL).

    Waiting here keeps the operator's start (seconds of imports on a loaded machine) out of
    the tests' own bounded waits. And the port is free when chosen, not when the operator
    binds it: another process may take it meanwhile (any outgoing connection may draw it as
    its ephemeral port), so a start refused for that reason is tried on a new port, at most
    START_ATTEMPTS times.
    """
    for _ in range(START_ATTEMPTS):
        port = free_port()
        operator = world.start_operator("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
        url = f"http://127.0.0.1:{port}/metrics"

        async def answered(operator: Operator = operator, url: str = url) -> bool:
            if operator.exit_reason() is not None:
                return True  # stop waiting: the start failed
            samples = await scrape(url)
            return samples is not None and "cqrs_operator_stacks" in samples

        await wait_until(answered, timeout=STARTUP_TIMEOUT, what="the operator's /metrics")
        if operator.exit_reason() is None:
            return operator, url
        if f"cannot serve metrics on 127.0.0.1:{port}" not in operator.log_text():
            pytest.fail(f"the operator did not start: {operator.exit_reason()}")
    pytest.fail(f"no free metrics port held until the operator bound it, {START_ATTEMPTS} tries")


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


async def test_stack_metrics_follow_create_phase_delete_and_a_restart(world: World) -> None:
    stacks, namespace = world.stacks, world.namespace
    operator, url = await start_with_metrics(world)
    empty = await wait_metrics(url, operator, "metrics served", lambda s: True)
    # Every phase is exported from the start, 0 included; no stack yet.
    assert phases(empty) == dict.fromkeys(PHASES, 0)
    assert "cqrs_operator_stack_ready" not in empty
    assert value(empty, "cqrs_operator_reconcile_seconds_count") == 0

    await stacks.create(world.manifest("good"))
    broken = world.manifest("broken", f"{world.fresh}b")
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
    operator, url = await start_with_metrics(world)
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
    world: World,
) -> None:
    """No projector runs here (no kubelet): the backlog added to the stream is what the
    operator reads from Redis and exports, the signal that survives a stopped projector."""
    stacks, namespace = world.stacks, world.namespace
    operator, url = await start_with_metrics(world)
    await stacks.create(world.manifest("lagging"))
    await stacks.wait_ready("lagging", operator)

    def lag_is(events: int) -> Callable[[Samples], bool]:
        def check(s: Samples) -> bool:
            found = value(s, "cqrs_operator_stack_lag_events", namespace=namespace, stack="lagging")
            return found == events

        return check

    await wait_metrics(url, operator, "a lag of 0 once the stream exists", lag_is(0))
    redis = Redis.from_url(world.redis.url)
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


async def test_a_metrics_port_in_use_is_refused_with_a_clear_error(world: World) -> None:
    first, url = await start_with_metrics(world)
    await wait_metrics(url, first, "metrics served", lambda s: True)
    port = url.split(":")[2].split("/")[0]
    second = world.start_operator("--metrics-port", port, "--metrics-host", "127.0.0.1")
    assert second.process is not None
    assert second.process.wait(30) == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in second.log_text()


async def test_a_metrics_port_taken_before_the_operator_binds_it_is_chosen_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of every test here: the free port drawn is taken by another process before
    the operator (seconds later) binds it; the helper starts the operator again elsewhere."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        drawn, real = iter([taken]), free_port
        monkeypatch.setattr(sys.modules[__name__], "free_port", lambda: next(drawn, 0) or real())
        operator, url = await start_with_metrics(world)
    assert f":{taken}/" not in url and operator.exit_reason() is None
    assert "cqrs_operator_stacks" in (await scrape(url) or {})
