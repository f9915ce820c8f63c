"""OpenTelemetry traces of a write, from its request to its projection (TRACING=true).

Only imported when TRACING is on (``app.start_tracing``): with it off, no module of ours loads
OpenTelemetry, no span is made and no stream entry carries a trace field. The SDK comes with
the ``tracing`` extra (``pip install 'cqrs-stack[tracing]'``) and is configured by the
standard ``OTEL_*`` variables (service name, resource, sampler, exporter and its endpoint).

One write is one trace::

    POST /write                    SERVER    from the request's traceparent header, if any
    ├── commit                     INTERNAL  the group commit of the write's batch
    └── publish                    PRODUCER  the batch's XADD; the entry's traceparent field
        └── project                CONSUMER  the read-DB transaction that applied the entry

A batch is shared by many writes, yet every write gets its own ``commit``, ``publish`` and
``project`` span, a child of its own request's span: each write's trace is complete, and the
sampler's decision (parent-based by default) is the request's, so an unsampled write costs
only non-recording spans. The spans of one batch share its start and end times and carry its
size (``cqrs.batch.size``). A batch span linked to its writes would be a trace of its own,
sampled on its own, and show up in no write's trace.

Commands that no stream entry carried (published late by the publisher after a Redis outage,
or applied by the catch-up sweep from the write DB) have no trace context to continue: the
write DB keeps none. Each page the sweep applies is a ``catch-up`` span, the root of a trace
of its own, with the number and the positions of its commands.

Keys and values are never span attributes.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, events
from .config import HEADER_VARIABLES, Settings
from .errors import TracingUnavailable

log = logging.getLogger(__name__)

# The stream entry's field holding the W3C traceparent of the event's publish span.
TRACE_FIELD = "traceparent"
_TRACE_FIELD_BYTES = TRACE_FIELD.encode()
_W3C = TraceContextTextMapPropagator()
# Route templates of the spans' names (keys stay out of traces); other paths: the method only.
_ROUTES = {"/write", "/stats", "/"}
# Probes and scrapes, every few seconds from every kubelet and Prometheus: no trace of their own.
_UNTRACED = {"/health", "/ready", "/metrics"}
_READ_PREFIX, _HISTORY_SUFFIX = "/read/", "/history"


class Tracing:
    """The process's tracer: the spans of requests, commits, publishes and projections."""

    def __init__(self, provider: TracerProvider, *, owned: bool = True) -> None:
        self._provider = provider
        self._owned = owned  # built here from OTEL_*, so shut down here
        self._tracer = provider.get_tracer("cqrs_stack", __version__)

    def current(self) -> Context:
        """The context of the code running now (a request's span, on the write path)."""
        return otel_context.get_current()

    def server_spans(self, app: ASGIApp) -> ServerSpans:
        """``app`` behind a layer that makes each HTTP request a server span."""
        return ServerSpans(app, self._tracer)

    def committing(self, parents: Sequence[Context | None]) -> Stage:
        """One ``commit`` span per write of a batch, begun now."""
        attributes = {"db.system.name": "postgresql", "cqrs.batch.size": len(parents)}
        return Stage(self._tracer, "commit", SpanKind.INTERNAL, parents, attributes)

    def publishing(self, parents: Sequence[Context | None], stream: str) -> Stage:
        """One ``publish`` span per event of a batch, begun now; their contexts go in the
        stream entries (``Stage.traceparents``)."""
        attributes = {
            "messaging.system": "redis",
            "messaging.operation.type": "send",
            "messaging.destination.name": stream,
            "cqrs.batch.size": len(parents),
        }
        return Stage(self._tracer, "publish", SpanKind.PRODUCER, parents, attributes)

    def projecting(self, fields: Sequence[dict[bytes, bytes]], stream: str, group: str) -> Stage:
        """One ``project`` span per entry of a batch that carries a trace context, begun now;
        entries without one (published untraced, or by the publisher) get none."""
        attributes = {
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.destination.name": stream,
            "messaging.consumer.group.name": group,
            "cqrs.batch.size": len(fields),
        }
        parents = [entry_context(f) for f in fields]
        return Stage(self._tracer, "project", SpanKind.CONSUMER, parents, attributes)

    @contextmanager
    def catching_up(self, commands: Sequence[events.Command]) -> Iterator[None]:
        """A ``catch-up`` span (a trace of its own) around applying one page of the sweep."""
        positions = [command.position for command in commands] or [0]
        attributes = {
            "cqrs.command.count": len(commands),
            "cqrs.position.first": min(positions),
            "cqrs.position.last": max(positions),
        }
        with self._tracer.start_as_current_span(
            "catch-up", context=Context(), kind=SpanKind.INTERNAL, attributes=attributes
        ):
            yield

    async def shutdown(self, within: float) -> None:
        """Export the spans still queued, for at most ``within`` seconds (off the loop).

        The export runs in a daemon thread, not the loop's executor: the interpreter joins
        executor threads at exit, so an export still waiting on a hung collector (up to
        OTEL_EXPORTER_OTLP_TIMEOUT per batch) would hold the exit past the bound wherever the
        process exits by unwinding, as PID 1 of a container does (uvicorn's re-raised SIGTERM
        is ignored there)."""
        if not self._owned:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def export() -> None:
            try:
                self._provider.shutdown()
            finally:
                with suppress(RuntimeError):  # the loop is closed already: nobody waits
                    loop.call_soon_threadsafe(finished)

        # The SDK's own exit hook would shut the provider down again at exit, in the main
        # thread: were this thread not yet past its start then, that call would wait for the
        # hung export, unbounded by SHUTDOWN_TIMEOUT.
        atexit.unregister(self._provider.shutdown)
        threading.Thread(target=export, name="tracing-shutdown", daemon=True).start()
        try:
            async with asyncio.timeout(max(within, 0.0)):
                await done
        except TimeoutError:
            log.warning("tracing: spans still queued at exit were not exported")


class Stage:
    """The spans of one stage of a batch, one per item with a parent context (None: none)."""

    def __init__(
        self,
        tracer: trace.Tracer,
        name: str,
        kind: SpanKind,
        parents: Sequence[Context | None],
        attributes: dict[str, Any],
    ) -> None:
        started = time.time_ns()
        self._spans: list[Span | None] = [
            None
            if parent is None
            else tracer.start_span(
                name, context=parent, kind=kind, attributes=attributes, start_time=started
            )
            for parent in parents
        ]

    def traceparents(self) -> list[str]:
        """The W3C traceparent of each item's span ('' for an item without one)."""
        return [_traceparent(span) for span in self._spans]

    def end(self, error: BaseException | None = None, failed: Collection[int] = ()) -> None:
        """End every span at one time: all in error with ``error``, else those of ``failed``
        (indexes of items that this stage refused)."""
        ended = time.time_ns()
        for index, span in enumerate(self._spans):
            if span is None:
                continue
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            elif index in failed:
                span.set_status(Status(StatusCode.ERROR, "refused"))
            span.end(end_time=ended)


def _traceparent(span: Span | None) -> str:
    """A span's W3C traceparent, as the propagator writes it ('' for none, or an invalid one)."""
    found = None if span is None else span.get_span_context()
    if found is None or not found.is_valid:
        return ""
    return f"00-{found.trace_id:032x}-{found.span_id:016x}-{found.trace_flags:02x}"


def entry_context(fields: dict[bytes, bytes]) -> Context | None:
    """The trace context a stream entry carries (its traceparent field), if a valid one."""
    raw = fields.get(_TRACE_FIELD_BYTES)
    if not raw:
        return None
    found = _W3C.extract({TRACE_FIELD: raw.decode("latin-1")}, context=Context())
    if not trace.get_current_span(found).get_span_context().is_valid:
        return None
    return found


class _HeaderGetter(Getter[list[tuple[bytes, bytes]]]):
    """Reads propagation headers (traceparent, tracestate, baggage) from an ASGI scope."""

    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier if header == name]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


_HEADERS = _HeaderGetter()


class ServerSpans:
    """Each HTTP request a server span, continuing the trace of its traceparent header (the
    propagators of OTEL_PROPAGATORS); the request runs with that span current. Probes and
    scrapes (/health, /ready, /metrics) are not traced."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self.app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNTRACED:
            await self.app(scope, receive, send)
            return
        parent = propagate.extract(scope["headers"], getter=_HEADERS)
        method, route = scope["method"], _route(scope["path"])
        attributes: dict[str, Any] = {"http.request.method": method}
        if route is not None:
            attributes["http.route"] = route
        span = self._tracer.start_span(
            f"{method} {route}" if route else method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
        )

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, str(status)))
            await send(message)

        with trace.use_span(span, end_on_exit=True):
            await self.app(scope, receive, answer)


def _route(path: str) -> str | None:
    if path in _ROUTES:
        return path
    if path.startswith(_READ_PREFIX):
        return "/read/{key}/history" if path.endswith(_HISTORY_SUFFIX) else "/read/{key}"
    return None


def start_tracing(settings: Settings, role: str) -> Tracing:
    """The process's ``Tracing``: the global tracer provider when one is set up already (an
    OpenTelemetry distro, ``opentelemetry-instrument``), else one built from the OTEL_*
    variables and made global. Raises ``TracingUnavailable`` for an exporter it cannot use."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return Tracing(current, owned=False)
    attributes = {}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = f"cqrs-stack-{role}"
    # The sampler (OTEL_TRACES_SAMPLER), span limits and the batching of exports
    # (OTEL_BSP_*) are read from the environment by the SDK itself.
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in _exporters(os.environ.get("OTEL_TRACES_EXPORTER", "otlp")):
        provider.add_span_processor(_batching(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on service=%s", provider.resource.attributes.get("service.name"))
    return Tracing(provider)


# The BatchSpanProcessor's arguments, as its ValueError names them, and their variables.
_BSP_VARIABLES = {
    "max_export_batch_size": "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "schedule_delay_millis": "OTEL_BSP_SCHEDULE_DELAY",
    "max_queue_size": "OTEL_BSP_MAX_QUEUE_SIZE",
}


def _batching(exporter: SpanExporter) -> BatchSpanProcessor:
    """A BatchSpanProcessor as the OTEL_BSP_* variables say; values it refuses are a
    ``TracingUnavailable`` naming the variables (the SDK's ValueError names its arguments)."""
    try:
        return BatchSpanProcessor(exporter)
    except ValueError as exc:
        message = str(exc).rstrip(".")
        for argument, variable in _BSP_VARIABLES.items():
            message = message.replace(argument, variable)
        raise TracingUnavailable(message) from None


# OTEL_EXPORTER_OTLP_*HEADERS as the OTLP exporter parses them (liberally): comma-separated
# name=value, the name an HTTP token, the value visible ASCII or spaces without , ; " or \.
_HEADER_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER_VALUE = r"[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
_HEADER_ENTRY = re.compile(rf"[ \t]*{_HEADER_NAME}[ \t]*=[ \t]*{_HEADER_VALUE}[ \t]*")
_HEADER_DELIMITER = re.compile(r"[ \t]*,[ \t]*")


def check_headers(environ: Mapping[str, str]) -> None:
    """Refuse headers for the collector that the exporter would drop with a warning echoing
    the entry (an API key in clear): a ``TracingUnavailable`` naming the variable only."""
    for variable in HEADER_VARIABLES:
        value = environ.get(variable)
        if value is None:
            continue
        for entry in _HEADER_DELIMITER.split(value):
            if entry and not _HEADER_ENTRY.fullmatch(entry.strip()):
                raise TracingUnavailable(
                    f"{variable}: not a comma-separated list of name=value headers (a value "
                    'URL-encoded, without , ; " or \\); its value is not shown'
                )


def _exporters(names: str) -> list[SpanExporter]:
    """The exporters OTEL_TRACES_EXPORTER names: otlp (over HTTP, the OTEL_EXPORTER_OTLP_*
    variables), console, none."""
    found: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name in ("", "none"):
            continue
        if name == "console":
            found.append(ConsoleSpanExporter())
        elif name == "otlp":
            found.append(_otlp_exporter())
        else:
            raise TracingUnavailable(
                f"OTEL_TRACES_EXPORTER={names!r}: {name!r} is not one of otlp, console, none"
            )
    return found


def _otlp_exporter() -> SpanExporter:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol not in ("", "http/protobuf"):
        raise TracingUnavailable(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: traces are sent over http/protobuf only"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TracingUnavailable(
            "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http"
            " (pip install 'cqrs-stack[tracing]')"
        ) from exc
    check_headers(os.environ)
    return OTLPSpanExporter()
