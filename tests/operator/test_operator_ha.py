"""High availability: two operator replicas elect a leader on a Lease; exactly one reconciles.

Both run as the chart's ServiceAccount under the chart's RBAC (the Lease Role in the
operator's namespace included), with short lease timings. A killed leader is replaced within
lease duration + retry period (+ a margin for a loaded machine), and the new leader applies a
change made after the kill; a frozen leader (SIGSTOP) is replaced too, and once continued it
sees that it lost the Lease and exits without reconciling; a leader stopped gracefully
releases the Lease, so its follower takes over well within one lease duration.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from cqrs_operator.leadership import LOST_EXIT_CODE
from tests.fixtures.control_plane import free_loopback_ports
from tests.operator.fixtures_operator import Operator, Stacks, stack_manifest, wait_until
from tests.operator.test_operator_rbac import (
    RELEASE,
    apply_rendered,
    render_operator_rbac,
    service_account,
)

LEASE = f"{RELEASE}-cqrs-stack-operator"  # the chart's operatorName, its RBAC's resourceName
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 4, 3.0, 0.5
# Time to notice the kill on a machine shared by many processes (not part of the guarantee).
MARGIN = 3.0
TAKEOVER_BOUND = LEASE_DURATION + RETRY_PERIOD + MARGIN
HANDLED = "Handler 'reconcile_stack' succeeded"
TIMER_HANDLED = "Timer 'reverify_stack' succeeded"


@dataclass
class Replicas:
    """Two operator replicas of one installation and the Lease they share."""

    api: client.ApiClient
    namespace: str  # the operator's namespace, where the Lease is
    operators: dict[str, Operator]
    health: dict[str, int]  # identity -> liveness port

    async def holder(self) -> str | None:
        try:
            lease = await client.CoordinationV1Api(self.api).read_namespaced_lease(
                LEASE, self.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        holder: str | None = lease.spec.holder_identity or None
        return holder

    async def wait_holder(self, among: set[str], timeout: float) -> str:
        async def held() -> str | None:
            found = await self.holder()
            return found if found in among else None

        result: str = await wait_until(held, timeout=timeout, what=f"Lease held by {among}")
        return result

    def other(self, identity: str) -> str:
        return next(i for i in self.operators if i != identity)


async def start_replicas(
    kube_api: client.ApiClient,
    kube_apiserver: Any,
    namespace: str,
    operator_factory: Callable[..., Operator],
    lease_duration: int = LEASE_DURATION,
) -> Replicas:
    """The chart's RBAC applied; two operators with its ServiceAccount's token."""
    docs = render_operator_rbac(namespace)
    await apply_rendered(kube_api, docs)
    op_namespace, account = service_account(docs)
    kubeconfig: Path = kube_apiserver.kubeconfig_for_token(
        kube_apiserver.create_token(op_namespace, account)
    )
    ports = free_loopback_ports(2)
    operators, health = {}, {}
    for index, port in enumerate(ports):
        identity = f"replica-{index}"
        operators[identity] = operator_factory(
            kubeconfig,
            namespace,
            "--leader-elect",
            f"--leader-election-namespace={op_namespace}",
            f"--leader-election-id={LEASE}",
            f"--leader-election-identity={identity}",
            f"--lease-duration={lease_duration}",
            f"--renew-deadline={RENEW_DEADLINE}",
            f"--retry-period={RETRY_PERIOD}",
            f"--liveness=http://127.0.0.1:{port}/healthz",
        )
        health[identity] = port
    return Replicas(kube_api, op_namespace, operators, health)


def healthz(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        return answer.status, answer.read().decode()


async def read_api_replicas(api: client.ApiClient, namespace: str, stack: str) -> int | None:
    dep = await client.AppsV1Api(api).read_namespaced_deployment(f"{stack}-read-api", namespace)
    replicas: int | None = dep.spec.replicas
    return replicas


async def leader_with_a_ready_stack(
    replicas: Replicas, stacks: Stacks, manifest: dict[str, Any]
) -> tuple[str, str]:
    """(leader, follower) once the stack is Ready under the leader alone."""
    leader = await replicas.wait_holder(set(replicas.operators), timeout=30)
    follower = replicas.other(leader)
    await stacks.create(manifest)
    await stacks.wait_ready(manifest["metadata"]["name"], replicas.operators[leader])
    assert HANDLED in replicas.operators[leader].log_text()
    follower_log = replicas.operators[follower].log_text()
    assert "waiting for leadership" in follower_log
    assert HANDLED not in follower_log and "leadership acquired" not in follower_log
    assert replicas.operators[follower].exit_reason() is None
    # The follower runs no kopf, yet answers its liveness probe.
    status, text = await asyncio.to_thread(healthz, replicas.health[follower])
    assert (status, text) == (200, "following")
    return leader, follower


async def test_a_killed_leader_is_replaced_within_the_bound(
    kube_api: client.ApiClient,
    kube_apiserver: Any,
    namespace: str,
    stacks: Stacks,
    operator_factory: Callable[..., Operator],
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    replicas = await start_replicas(kube_api, kube_apiserver, namespace, operator_factory)
    manifest = stack_manifest("ha", fresh_names, write_pg, read_pg, redis_server.url)
    leader, follower = await leader_with_a_ready_stack(replicas, stacks, manifest)

    replicas.operators[leader].kill()
    killed = time.monotonic()
    await stacks.patch("ha", {"spec": {"readApi": {"replicas": 3}}})
    await replicas.wait_holder({follower}, timeout=TAKEOVER_BOUND)
    took = time.monotonic() - killed
    assert took <= TAKEOVER_BOUND, f"took over after {took:.1f} s"
    # Not before the lease ran out as the follower saw it: the last renewal was at most one
    # retry period before the kill (less a request's latency).
    assert took >= LEASE_DURATION - RETRY_PERIOD - 0.5, f"took over after {took:.1f} s"

    async def applied() -> bool:
        return await read_api_replicas(kube_api, namespace, "ha") == 3

    await wait_until(
        applied,
        timeout=30,
        what="the new leader applies the change made after the kill",
        alive=replicas.operators[follower].exit_reason,
    )
    await stacks.wait_ready("ha", replicas.operators[follower])


async def test_a_frozen_leader_is_replaced_and_stops_when_it_resumes(
    kube_api: client.ApiClient,
    kube_apiserver: Any,
    namespace: str,
    stacks: Stacks,
    operator_factory: Callable[..., Operator],
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    replicas = await start_replicas(kube_api, kube_apiserver, namespace, operator_factory)
    manifest = stack_manifest("hung", fresh_names, write_pg, read_pg, redis_server.url)
    leader, follower = await leader_with_a_ready_stack(replicas, stacks, manifest)
    frozen = replicas.operators[leader]
    assert frozen.process is not None

    frozen.process.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        await replicas.wait_holder({follower}, timeout=TAKEOVER_BOUND)
        assert time.monotonic() - stopped <= TAKEOVER_BOUND
        await stacks.patch("hung", {"spec": {"readApi": {"replicas": 3}}})

        async def applied() -> bool:
            return await read_api_replicas(kube_api, namespace, "hung") == 3

        await wait_until(applied, timeout=30, what="the new leader applies the change")
        before = len(frozen.log_text())
    finally:
        frozen.process.send_signal(signal.SIGCONT)

    def exited() -> int | None:
        assert frozen.process is not None
        return frozen.process.poll()

    async def gone() -> bool:
        return exited() is not None

    await wait_until(gone, timeout=RETRY_PERIOD + 10, what="the resumed old leader exits")
    assert exited() == LOST_EXIT_CODE, frozen.log_tail()
    after = frozen.log_text()[before:]
    assert "leadership lost" in after, frozen.log_tail()
    assert HANDLED not in after and TIMER_HANDLED not in after, after
    assert await replicas.holder() == follower  # it did not take the Lease back either
    await stacks.wait_ready("hung", replicas.operators[follower])


async def test_a_leader_stopped_gracefully_hands_over_at_once(
    kube_api: client.ApiClient,
    kube_apiserver: Any,
    namespace: str,
    operator_factory: Callable[..., Operator],
) -> None:
    """SIGTERM (an upgrade, a drained node): the Lease is released, so the follower takes
    over at its next try, long before a lease duration would have run out."""
    long_lease = 30
    replicas = await start_replicas(
        kube_api, kube_apiserver, namespace, operator_factory, lease_duration=long_lease
    )
    leader = await replicas.wait_holder(set(replicas.operators), timeout=30)
    follower = replicas.other(leader)

    async def leading() -> bool:
        return "leadership acquired" in replicas.operators[leader].log_text()

    await wait_until(leading, timeout=10, what="the leader's log line")
    stopping = time.monotonic()
    await asyncio.to_thread(replicas.operators[leader].stop)
    assert "leadership released" in replicas.operators[leader].log_text()
    await replicas.wait_holder({follower}, timeout=RETRY_PERIOD + MARGIN)
    assert time.monotonic() - stopping < long_lease / 2
