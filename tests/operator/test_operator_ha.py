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
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from cqrs_operator.leadership import LOST_EXIT_CODE
from tests.fixtures.control_plane import free_loopback_ports
from tests.operator.fixtures_operator import (
    RELEASE,
    ChartRbac,
    Operator,
    Stacks,
    World,
    wait_until,
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
    world: World,
    rbac: ChartRbac,
    lease_duration: int = LEASE_DURATION,
    via_port: int | None = None,
) -> Replicas:
    """Two operators with the chart's ServiceAccount's token (reaching the API server through
    loopback port ``via_port`` when given: a proxy)."""
    kubeconfig: Path = rbac.kubeconfig
    if via_port is not None:
        proxied = kubeconfig.with_name(f"via-{via_port}-{kubeconfig.name}")
        server = urlsplit(world.apiserver.server)
        text = await asyncio.to_thread(kubeconfig.read_text)
        moved = text.replace(server.netloc, f"{server.hostname}:{via_port}")
        await asyncio.to_thread(proxied.write_text, moved)
        kubeconfig = proxied
    ports = free_loopback_ports(2)
    operators, health = {}, {}
    for index, port in enumerate(ports):
        identity = f"replica-{index}"
        operators[identity] = world.start_operator(
            "--leader-elect",
            f"--leader-election-namespace={rbac.namespace}",
            f"--leader-election-id={LEASE}",
            f"--leader-election-identity={identity}",
            f"--lease-duration={lease_duration}",
            f"--renew-deadline={RENEW_DEADLINE}",
            f"--retry-period={RETRY_PERIOD}",
            f"--liveness=http://127.0.0.1:{port}/healthz",
            kubeconfig=kubeconfig,
        )
        health[identity] = port
    return Replicas(world.api, rbac.namespace, operators, health)


class BlackHoleProxy:
    """A TCP proxy on loopback in front of the API server. ``black_hole()``: every byte is
    held from then on (connections open and new ones accepted, nothing answered), as a
    network that drops packets; ``restore()``: new connections are forwarded again (the held
    ones stay dead, as after a real outage)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.holding = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def black_hole(self) -> None:
        self.holding = True

    def restore(self) -> None:
        self.holding = False

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.holding:
            return  # accepted, never answered
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.append(up_w)
        for source, sink in ((reader, up_w), (up_r, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dead = False  # once held, a connection never forwards again
        while data := await reader.read(65536):
            dead = dead or self.holding
            if not dead:
                writer.write(data)
                await writer.drain()
        if not dead:
            writer.close()


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

    async def handled() -> bool:
        return HANDLED in replicas.operators[leader].log_text()

    # kopf logs a handler's success after the status patch that makes the stack Ready: on a
    # loaded machine the line can come a moment after wait_ready returns.
    await wait_until(handled, timeout=30, what="the leader's handler to log its success")
    follower_log = replicas.operators[follower].log_text()
    assert "waiting for leadership" in follower_log
    assert HANDLED not in follower_log and "leadership acquired" not in follower_log
    assert replicas.operators[follower].exit_reason() is None
    # The follower runs no kopf, yet answers its liveness probe.
    status, text = await asyncio.to_thread(healthz, replicas.health[follower])
    assert (status, text) == (200, "following")
    return leader, follower


async def test_a_killed_leader_is_replaced_within_the_bound(
    world: World, chart_rbac: ChartRbac
) -> None:
    replicas = await start_replicas(world, chart_rbac)
    stacks, kube_api, namespace = world.stacks, world.api, world.namespace
    leader, follower = await leader_with_a_ready_stack(replicas, stacks, world.manifest("ha"))

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
    world: World, chart_rbac: ChartRbac
) -> None:
    replicas = await start_replicas(world, chart_rbac)
    stacks, kube_api, namespace = world.stacks, world.api, world.namespace
    leader, follower = await leader_with_a_ready_stack(replicas, stacks, world.manifest("hung"))
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
    world: World, chart_rbac: ChartRbac
) -> None:
    """SIGTERM (an upgrade, a drained node): the Lease is released, so the follower takes
    over at its next try, long before a lease duration would have run out."""
    long_lease = 30
    replicas = await start_replicas(world, chart_rbac, lease_duration=long_lease)
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


async def test_a_follower_leads_within_the_bound_after_a_black_holed_api_answers_again(
    world: World, chart_rbac: ChartRbac
) -> None:
    """The API server accepts connections and answers nothing for longer than a lease
    duration: the leader stops (renew deadline), and once the API answers again a follower
    leads within lease duration + retry period (its Lease requests have a timeout: none
    hangs on a dead connection)."""
    proxy = BlackHoleProxy(urlsplit(world.apiserver.server).port or 443)
    await proxy.start()
    try:
        replicas = await start_replicas(world, chart_rbac, via_port=proxy.port)
        leader = await replicas.wait_holder(set(replicas.operators), timeout=30)
        follower = replicas.other(leader)

        async def following() -> bool:
            return "waiting for leadership" in replicas.operators[follower].log_text()

        await wait_until(following, timeout=10, what="the follower tries")
        proxy.black_hole()
        outage = LEASE_DURATION * 2 + RENEW_DEADLINE  # past the lease, and past the deadline

        def leader_gone() -> int | None:
            process = replicas.operators[leader].process
            assert process is not None
            return process.poll()

        async def stopped() -> bool:
            return leader_gone() is not None

        await wait_until(stopped, timeout=outage, what="the cut-off leader stops")
        assert leader_gone() == LOST_EXIT_CODE, replicas.operators[leader].log_tail()
        await asyncio.sleep(max(0.0, outage - RENEW_DEADLINE))  # the outage lasts on
        proxy.restore()
        restored = time.monotonic()
        await replicas.wait_holder({follower}, timeout=TAKEOVER_BOUND + 5)
        took = time.monotonic() - restored
        assert took <= TAKEOVER_BOUND, f"led {took:.1f} s after the API answered again"
        assert replicas.operators[follower].exit_reason() is None
    finally:
        await proxy.stop()


async def test_a_lease_the_api_refuses_is_a_clear_error_and_an_unhealthy_pod(
    kube_api: client.ApiClient,
    kube_apiserver: Any,
    namespace: str,
    operator_factory: Callable[..., Operator],
) -> None:
    """No such Lease namespace (404 on create), no RBAC on leases (403): each is logged as
    an error naming the namespace or the permission, and /healthz answers 500 (the kubelet
    restarts the pod, its events show why) instead of "following"."""
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_service_account(namespace, {"metadata": {"name": "no-leases"}})
    no_rbac = kube_apiserver.kubeconfig_for_token(
        kube_apiserver.create_token(namespace, "no-leases")
    )
    cases = {
        "missing": (kube_apiserver.kubeconfig, f"{namespace}-absent", "does not exist"),
        "forbidden": (no_rbac, namespace, "forbidden"),
    }
    for case, port in zip(cases, free_loopback_ports(2), strict=True):
        kubeconfig, lease_ns, said = cases[case]
        op = operator_factory(
            kubeconfig,
            namespace,
            "--leader-elect",
            f"--leader-election-namespace={lease_ns}",
            f"--lease-duration={LEASE_DURATION}",
            f"--renew-deadline={RENEW_DEADLINE}",
            f"--retry-period={RETRY_PERIOD}",
            f"--liveness=http://127.0.0.1:{port}/healthz",
        )

        async def unhealthy(port: int = port) -> tuple[int, str] | None:
            try:
                await asyncio.to_thread(healthz, port)
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError:
                return None  # not listening yet
            return None

        status, text = await wait_until(
            unhealthy, timeout=15, what=f"{case}: /healthz unhealthy", alive=op.exit_reason
        )
        assert status == 500 and said in text and repr(lease_ns) in text, (case, text)
        assert "leader election impossible" in op.log_text(), op.log_tail()
        assert "unreachable" not in op.log_text(), op.log_tail()
