"""Leader election on a ``coordination.k8s.io/v1`` Lease: of several operator replicas,
exactly one reconciles.

kopf's own peering does not give that: it is built to let a developer's operator of higher
priority silence the deployed ones, it pauses *every* operator of equal priority (the replicas
of one Deployment are equal), and it has no notion of a leader that hung and came back. So
the replicas elect a leader on a Lease, with client-go's rules:

- A candidate takes the Lease when it has no holder, or when the holder's record has not
  changed for ``leaseDurationSeconds`` *as the candidate observed it* (its own monotonic clock:
  no trust in the other node's wall clock). Every write names the resourceVersion it read, so
  of two candidates exactly one wins (the other gets a 409 Conflict).
- The leader renews every ``retry_period``. When it has not renewed successfully for
  ``renew_deadline`` (shorter than the lease duration), or when it sees another holder, it
  stops at once: the process exits (``LOST_EXIT_CODE``) and the kubelet restarts it as a
  follower. Since renew_deadline < lease_duration, the old leader stops before any follower
  may take over.
- A leader that was frozen (SIGSTOP, a stalled node) and resumes must not act on a lease it
  may have lost: ``Leadership.ensure_leading`` is checked before each handler and before each
  request of the operator's API client (``FencedApiClient``), and exits when the last renewal
  is older than the renew deadline. What no client-side check can fence is a request already
  on the wire when the process froze, and a database statement of a reconcile in progress.
- On a graceful stop (SIGTERM: an upgrade, a drained node) the leader releases the Lease, so
  a follower takes over within one retry period instead of one lease duration.
- Every Lease request has a timeout (``request_timeout``: half the renew deadline, at least
  one second, as client-go's), and each try of a follower is bounded by the renew deadline: a
  black-holed API server (connections accepted, never answered) delays a takeover by at most
  one request timeout after it answers again, not by the kernel's TCP timeouts.
- A Lease the API refuses for good (403: no RBAC on leases; 404 on create: no such namespace)
  is logged as an error naming the namespace and the missing permission, and the follower's
  liveness endpoint answers 500 with that message, so the kubelet restarts the pod and
  ``kubectl describe pod`` shows why; the replica keeps trying (RBAC may be granted later).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

# The exit status of a leader that lost its lease (any non-zero status restarts the container).
LOST_EXIT_CODE = 3
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class ElectionConfig:
    """Where the Lease is and the timings of the election (client-go's defaults: 15/10/2 s).

    ``lease_duration``: seconds a follower waits, from the last change of the Lease it saw,
    before it takes a Lease that its holder did not renew. ``renew_deadline``: seconds the
    leader keeps trying to renew before it gives up leading (< lease_duration).
    ``retry_period``: seconds between two tries, of the leader to renew and of a follower to
    acquire.
    """

    namespace: str
    name: str
    identity: str
    lease_duration: int = 15
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def problem(self) -> str | None:
        """What is wrong with the timings, or None: each bound must leave the next its room."""
        if not 1 <= self.lease_duration <= 3600:
            return f"lease duration {self.lease_duration} s is not within 1..3600"
        if not self.renew_deadline < self.lease_duration:
            return (
                f"renew deadline {self.renew_deadline} s must be shorter than the lease "
                f"duration {self.lease_duration} s (else two leaders could overlap)"
            )
        if not 0 < self.retry_period * 1.2 < self.renew_deadline:
            return (
                f"retry period {self.retry_period} s must be positive and leave room for "
                f"retries within the renew deadline {self.renew_deadline} s"
            )
        return None


def default_identity() -> str:
    """This replica's name in the Lease: the pod's name and a random suffix (a restarted
    container is a new candidate, never mistaken for the holder it was)."""
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}_{secrets.token_hex(4)}"


def default_namespace() -> str | None:
    """The namespace of the Lease: $POD_NAMESPACE, else the pod's own (in a cluster)."""
    if found := os.environ.get("POD_NAMESPACE"):
        return found
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # the Lease's MicroTime, in UTC


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime(MICRO_TIME)


@dataclass(frozen=True)
class _Observed:
    """The Lease's record as last read, and when (monotonic) it was seen to change."""

    resource_version: str
    holder: str
    duration: int
    at: float
    transitions: int = 0


class Leadership:
    """One candidate in the election of one Lease."""

    def __init__(
        self,
        api: client.ApiClient,
        config: ElectionConfig,
        exit: Callable[[int], Any] = os._exit,
    ) -> None:
        self.api = api
        self.config = config
        self._leases = client.CoordinationV1Api(api)
        self._observed: _Observed | None = None
        self._renewed_at: float | None = None  # monotonic start of the last successful renew
        self._exit = exit
        self.last_attempt = time.monotonic()
        # Why the API refuses the Lease for good (403/404), from the last try; None when fine.
        self.misconfigured: str | None = None
        self._creating = False  # the try in progress is creating the Lease

    @property
    def request_timeout(self) -> float:
        """Seconds each Lease request may take (client-go: renew deadline / 2, >= 1 s)."""
        return max(self.config.renew_deadline / 2, 1.0)

    # ---------------------------------------------------------------- the state

    def leading(self) -> bool:
        """True while the last successful renewal is younger than the renew deadline."""
        return (
            self._renewed_at is not None
            and time.monotonic() - self._renewed_at < self.config.renew_deadline
        )

    def ensure_leading(self) -> None:
        """Exit the process at once unless this replica surely still holds the Lease: a
        frozen leader that resumes must not act (another may lead by now)."""
        if self._renewed_at is not None and not self.leading():
            self._lost(
                f"the last renewal is {time.monotonic() - self._renewed_at:.1f} s old "
                f"(renew deadline {self.config.renew_deadline} s)"
            )

    def _lost(self, why: str) -> None:
        log.error(
            "leadership lost: stopping at once lease=%s/%s identity=%s reason=%s",
            self.config.namespace,
            self.config.name,
            self.config.identity,
            why,
        )
        self._exit(LOST_EXIT_CODE)

    # ---------------------------------------------------------------- one try

    async def try_acquire_or_renew(self) -> bool:
        """One attempt to hold the Lease: create it, renew it, or take it over when free or
        expired. True when this replica holds it now."""
        started = time.monotonic()
        self.last_attempt = started
        cfg = self.config
        try:
            lease = await self._leases.read_namespaced_lease(
                cfg.name, cfg.namespace, _request_timeout=self.request_timeout
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            return await self._create(started)
        spec = lease.spec
        holder = spec.holder_identity or ""
        rv = lease.metadata.resource_version
        if self._observed is None or self._observed.resource_version != rv:
            duration = int(spec.lease_duration_seconds or cfg.lease_duration)
            self._observed = _Observed(rv, holder, duration, started)
        observed = self._observed
        ours = holder == cfg.identity
        if holder and not ours and started - observed.at < observed.duration:
            return False  # held, and renewed within its duration as we saw it
        now = _micro_time()
        body = self._body(
            rv,
            holderIdentity=cfg.identity,
            leaseDurationSeconds=cfg.lease_duration,
            acquireTime=(
                spec.acquire_time.strftime(MICRO_TIME) if ours and spec.acquire_time else now
            ),
            renewTime=now,
            leaseTransitions=(spec.lease_transitions or 0) + (0 if ours else 1),
        )
        try:
            updated = await self._leases.replace_namespaced_lease(
                cfg.name, cfg.namespace, body, _request_timeout=self.request_timeout
            )
        except ApiException as exc:
            if exc.status == 409:  # another candidate wrote first: read again next time
                return False
            raise
        self._won(updated, started, taken_over=not ours)
        return True

    def _body(self, resource_version: str | None, **spec: Any) -> Any:
        """A Lease to write; with ``resource_version`` the write fails (409) if another
        wrote since it was read."""
        metadata: dict[str, Any] = {"name": self.config.name, "namespace": self.config.namespace}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    async def _create(self, started: float) -> bool:
        cfg = self.config
        now = _micro_time()
        body = self._body(
            None,
            holderIdentity=cfg.identity,
            leaseDurationSeconds=cfg.lease_duration,
            acquireTime=now,
            renewTime=now,
            leaseTransitions=0,
        )
        self._creating = True
        try:
            created = await self._leases.create_namespaced_lease(
                cfg.namespace, body, _request_timeout=self.request_timeout
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        self._won(created, started, taken_over=True)
        return True

    def _won(self, lease: Any, started: float, taken_over: bool) -> None:
        cfg = self.config
        self._observed = _Observed(
            lease.metadata.resource_version,
            cfg.identity,
            cfg.lease_duration,
            started,
            lease.spec.lease_transitions or 0,
        )
        self._renewed_at = started
        if taken_over:
            log.info(
                "leadership acquired lease=%s/%s identity=%s",
                cfg.namespace,
                cfg.name,
                cfg.identity,
            )

    async def _attempt(self) -> bool | None:
        """One try that never raises and never takes longer than the renew deadline: True
        held, False not held, None the API failed."""
        self._creating = False
        try:
            held = await asyncio.wait_for(
                self.try_acquire_or_renew(), timeout=self.config.renew_deadline
            )
        except (ApiException, OSError, TimeoutError, aiohttp.ClientError) as exc:
            status = getattr(exc, "status", None)
            self.misconfigured = self._refusal(status)
            if self.misconfigured:
                log.error("leader election impossible: %s", self.misconfigured)
            else:
                log.warning(
                    "lease %s/%s unreachable: %s",
                    self.config.namespace,
                    self.config.name,
                    f"HTTP {status}" if status else type(exc).__name__,
                )
            return None
        self.misconfigured = None
        return held

    def _refusal(self, status: int | None) -> str | None:
        """What a 403/404 answer means for this Lease, or None (a transient failure)."""
        cfg = self.config
        if status == 403:
            verb = "create" if self._creating else "get/update"
            return (
                f"forbidden: this operator's account may not {verb} "
                f"leases.coordination.k8s.io {cfg.name!r} in namespace {cfg.namespace!r} "
                "(grant get, create, update on leases in a Role there)"
            )
        if status == 404 and self._creating:
            return (
                f"namespace {cfg.namespace!r} of the Lease does not exist "
                "(--leader-election-namespace / $POD_NAMESPACE)"
            )
        return None

    # ---------------------------------------------------------------- the loops

    async def acquire(self) -> None:
        """Wait, trying every retry period, until this replica leads."""
        cfg = self.config
        log.info(
            "waiting for leadership lease=%s/%s identity=%s",
            cfg.namespace,
            cfg.name,
            cfg.identity,
        )
        while True:
            if await self._attempt():
                return
            await asyncio.sleep(cfg.retry_period)

    async def keep(self) -> None:
        """While leading: renew every retry period; exit the process when the renew deadline
        passes without a renewal, or when another replica holds the Lease."""
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.retry_period)
            self.ensure_leading()  # frozen past the deadline: stop before anything else
            assert self._renewed_at is not None
            remaining = cfg.renew_deadline - (time.monotonic() - self._renewed_at)
            try:
                held = await asyncio.wait_for(self._attempt(), timeout=max(remaining, 0.01))
            except TimeoutError:
                held = None
            if held is False:
                holder = self._observed.holder if self._observed else "?"
                self._lost(f"the lease is held by {holder}")
            self.ensure_leading()

    async def release(self) -> None:
        """On a graceful stop: give the Lease up (if still ours) so that a follower takes
        over at its next try rather than after a whole lease duration."""
        if not self.leading() or self._observed is None:
            return
        cfg = self.config
        now = _micro_time()
        body = self._body(
            self._observed.resource_version,
            holderIdentity="",
            leaseDurationSeconds=1,
            acquireTime=now,
            renewTime=now,
            leaseTransitions=self._observed.transitions,
        )
        self._renewed_at = None
        try:
            await self._leases.replace_namespaced_lease(
                cfg.name, cfg.namespace, body, _request_timeout=self.request_timeout
            )
        except (ApiException, OSError, TimeoutError) as exc:
            log.warning("lease %s/%s not released: %s", cfg.namespace, cfg.name, exc)
            return
        log.info(
            "leadership released lease=%s/%s identity=%s", cfg.namespace, cfg.name, cfg.identity
        )


async def fence(api: client.ApiClient, leadership: Leadership) -> FencedApiClient:
    """``api`` as a FencedApiClient of the same configuration (``api`` is closed)."""
    fenced = FencedApiClient(api.configuration, leadership)
    await api.close()
    return fenced


class FencedApiClient(client.ApiClient):  # type: ignore[misc]
    """An API client that checks, before each request, that this replica still leads: the
    reconcile of a leader that froze and resumed stops at its next call, not after it."""

    def __init__(self, configuration: client.Configuration, leadership: Leadership) -> None:
        super().__init__(configuration)
        self._leadership = leadership

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        self._leadership.ensure_leading()
        return await super().request(*args, **kwargs)


@asynccontextmanager
async def follower_liveness(endpoint: str | None, leadership: Leadership) -> AsyncIterator[None]:
    """While following, serve the liveness endpoint kopf serves once leading (kopf is not
    running yet): healthy while the election loop keeps trying."""
    if not endpoint:
        yield
        return
    from urllib.parse import urlparse

    url = urlparse(endpoint)

    async def healthz(_: web.Request) -> web.Response:
        if leadership.misconfigured:
            return web.Response(status=500, text=leadership.misconfigured)
        stale = time.monotonic() - leadership.last_attempt
        if stale > leadership.config.retry_period * 3 + 30:
            return web.Response(status=500, text=f"election loop stalled for {stale:.0f} s")
        return web.Response(text="following")

    app = web.Application()
    app.router.add_get(url.path or "/", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, url.hostname or "0.0.0.0", url.port or 80)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()  # kopf binds the same port once leading
