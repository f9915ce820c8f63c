"""The operator's Prometheus metrics, served on ``--metrics-port`` (its own registry).

- ``cqrs_operator_reconcile_seconds``: histogram of one full reconcile of one stack (the
  create/update/resume handlers and the interval's re-verification alike).
- ``cqrs_operator_reconcile_errors_total{reason}``: reconciles that ended with a failed part,
  by the part's reason (each distinct reason of one reconcile counted once; ``InvalidSpec``
  for a spec that does not parse; the exception's class name for an unexpected failure).
- ``cqrs_operator_stacks{phase}``: the stacks in the watched namespaces by ``status.phase``
  (every phase exported, 0 included), and ``cqrs_operator_stack_ready{namespace,stack}``: 1
  while a stack's Ready condition is True, else 0. Both come from the watch of the stacks (what
  the API server holds), so a restarted operator reports every stack from its first listing,
  and a deleted stack leaves both.
- ``cqrs_operator_stack_lag_events{namespace,stack}``: the stream entries a stack's projector
  group has not acknowledged, as the operator last read them from Redis (``status.projector.lag``,
  every reconcile). It comes from the operator, not the projector, so it keeps reporting a
  backlog while no projector runs or answers scrapes; a stack whose lag could not be read yet
  has no sample.

The registry is the operator's alone: the services' metrics (cqrs_stack.metrics, importable in
this process) never appear on the operator's port.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import status as stack_status

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

RECONCILE_SECONDS = Histogram(
    "cqrs_operator_reconcile_seconds",
    "Duration of one full reconcile of one stack",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "cqrs_operator_reconcile_errors_total",
    "Reconciles that ended with a failed part, by the part's reason",
    ["reason"],
    registry=REGISTRY,
)
# The reason counted for a spec the operator cannot parse (the condition's reason too).
INVALID_SPEC = "InvalidSpec"


class _Failure(Protocol):
    reason: str


class _Outcome(Protocol):
    @property
    def errors(self) -> Sequence[_Failure]: ...


P = ParamSpec("P")
T = TypeVar("T", bound=_Outcome)


def count_failures(failures: Iterable[_Failure]) -> None:
    """Count one reconcile's failed parts: each distinct reason once."""
    for reason in sorted({f.reason for f in failures}):
        RECONCILE_ERRORS.labels(reason).inc()


def instrumented(fn: Callable[P, Awaitable[T | None]]) -> Callable[P, Awaitable[T | None]]:
    """Time each call of the reconcile ``fn`` and count how it failed: the errors of its
    outcome, ``InvalidSpec`` for None (a spec that does not parse), the class name of an
    exception (re-raised)."""

    @functools.wraps(fn)
    async def timed(*args: P.args, **kwargs: P.kwargs) -> T | None:
        started = time.perf_counter()
        try:
            outcome = await fn(*args, **kwargs)
        except Exception as exc:
            RECONCILE_ERRORS.labels(type(exc).__name__).inc()
            raise
        finally:
            RECONCILE_SECONDS.observe(time.perf_counter() - started)
        if outcome is None:
            RECONCILE_ERRORS.labels(INVALID_SPEC).inc()
        else:
            count_failures(outcome.errors)
        return outcome

    return timed


class StackCollector(Collector):
    """``cqrs_operator_stacks`` and ``cqrs_operator_stack_ready``, from the stacks' latest
    known state (kept by :meth:`observe` / :meth:`forget` from the watch)."""

    def __init__(self) -> None:
        # (namespace, name) -> (phase, ready, lag or None). Written on the event loop, read by
        # the exporter's thread: a copy is taken before iterating.
        self._stacks: dict[tuple[str, str], tuple[str, bool, int | None]] = {}

    def observe(self, body: Mapping[str, Any]) -> None:
        """Record a stack as the API server last showed it."""
        meta = body.get("metadata") or {}
        st = body.get("status") or {}
        phase = "Deleting" if meta.get("deletionTimestamp") else st.get("phase") or "Provisioning"
        conditions = {c.get("type"): c.get("status") for c in st.get("conditions") or []}
        ready = conditions.get(stack_status.READY) == "True"
        lag = (st.get("projector") or {}).get("lag")
        known = lag if isinstance(lag, int) and not isinstance(lag, bool) else None
        self._stacks[(meta["namespace"], meta["name"])] = (phase, ready, known)

    def forget(self, namespace: str, name: str) -> None:
        """A stack is gone: it leaves both metrics."""
        self._stacks.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stacks = dict(self._stacks)
        by_phase = GaugeMetricFamily(
            "cqrs_operator_stacks", "Stacks in the watched namespaces by phase", labels=["phase"]
        )
        counts = dict.fromkeys(stack_status.PHASES, 0)
        for phase, _, _ in stacks.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            by_phase.add_metric([phase], count)
        yield by_phase
        ready = GaugeMetricFamily(
            "cqrs_operator_stack_ready",
            "1 while the stack's Ready condition is True, else 0",
            labels=["namespace", "stack"],
        )
        for (namespace, name), (_, is_ready, _) in sorted(stacks.items()):
            ready.add_metric([namespace, name], 1 if is_ready else 0)
        yield ready
        lag = GaugeMetricFamily(
            "cqrs_operator_stack_lag_events",
            "Stream entries the stack's projector group has not acknowledged, as the operator "
            "last read them",
            labels=["namespace", "stack"],
        )
        for (namespace, name), (_, _, events) in sorted(stacks.items()):
            if events is not None:
                lag.add_metric([namespace, name], events)
        yield lag


STACKS = StackCollector()
REGISTRY.register(STACKS)


def serve(port: int, host: str) -> None:
    """Serve ``/metrics`` of the operator's registry on ``host:port`` (a daemon thread, so a
    scrape never waits on the event loop)."""
    start_http_server(port, addr=host, registry=REGISTRY)
