"""Tracing (TRACING=true): one write is one trace from its request to its projection, on real
PostgreSQL and Redis, with the app and the projector in this process and the SDK's in-memory
exporter; and with tracing off, no trace field in the stream and no OpenTelemetry loaded by
our code."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from redis.asyncio import Redis

from cqrs_stack import stream
from cqrs_stack.app import create_server_app, fastapi_app
from cqrs_stack.config import Settings
from cqrs_stack.localservers import RedisServer, free_port
from cqrs_stack.resources import close_resources, open_resources
from cqrs_stack.tracing import Tracing
from tests.fixtures.stack import Stack, wait_until
from tests.integration.test_stream_publish import commands

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
EVENT_FIELDS = {b"type", b"position", b"key", b"value", b"created_at"}


def traced(stack: Stack, **overrides: object) -> Settings:
    return Settings(**{k.lower(): v for k, v in stack.env.items()}, tracing=True, **overrides)


def in_memory(exporter: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Not owned: the write API's and the projector's resources share it, and the first one
    # closed must not shut the exporter down under the other.
    return Tracing(provider, owned=False)


@asynccontextmanager
async def write_api(
    settings: Settings, tracing: Tracing | None
) -> AsyncIterator[httpx.AsyncClient]:
    """The API of ``settings`` in this process (what `cqrs-stack api` serves), and a client."""
    served = create_server_app(settings, "api", tracing)
    app = fastapi_app(served)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=served)
        async with httpx.AsyncClient(transport=transport, base_url="http://cqrs") as client:
            yield client


@asynccontextmanager
async def projector(settings: Settings, tracing: Tracing | None) -> AsyncIterator[None]:
    resources = await open_resources(settings, "projector", tracing)
    try:
        yield
    finally:
        await close_resources(resources)


def of_trace(exporter: InMemorySpanExporter, name: str | None = None) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.context is not None
        and span.context.trace_id == int(TRACE_ID, 16)
        and name in (None, span.name)
    ]


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


@pytest.mark.parametrize("hot_paths", [True, False], ids=["hot-path", "framework"])
async def test_one_write_is_one_trace_from_request_to_projection(
    stack: Stack, hot_paths: bool
) -> None:
    """request (SERVER, child of the caller's traceparent) -> commit (INTERNAL) and publish
    (PRODUCER) -> project (CONSUMER, from the stream entry's traceparent field)."""
    exporter = InMemorySpanExporter()
    tracing = in_memory(exporter)
    settings = traced(stack, hot_paths=hot_paths)
    async with write_api(settings, tracing) as client, projector(settings, tracing):
        answer = await client.post(
            "/write", json={"key": "k", "value": "v"}, headers={"traceparent": TRACEPARENT}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["queued"] is False
        assert (await client.get("/ready")).status_code == 200  # probes make no traces

        async def projected() -> bool:
            return bool(of_trace(exporter, "project"))

        await wait_until(projected, 20, "the projection's span")
    servers = [s.name for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert servers == ["POST /write"]
    spans = of_trace(exporter)
    # One span of each, the framework's own server span included (FastAPI's is turned off).
    assert sorted(s.name for s in spans) == ["POST /write", "commit", "project", "publish"]
    (request,) = of_trace(exporter, "POST /write")
    (commit,) = of_trace(exporter, "commit")
    (publish,) = of_trace(exporter, "publish")
    (project,) = of_trace(exporter, "project")
    assert request.context is not None and publish.context is not None
    assert request.kind == SpanKind.SERVER
    assert request.parent is not None and request.parent.is_remote
    assert parent_of(request) == int(CALLER_SPAN, 16)
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    assert (commit.kind, parent_of(commit)) == (SpanKind.INTERNAL, request.context.span_id)
    assert (publish.kind, parent_of(publish)) == (SpanKind.PRODUCER, request.context.span_id)
    assert (project.kind, parent_of(project)) == (SpanKind.CONSUMER, publish.context.span_id)
    assert commit.attributes is not None and commit.attributes["cqrs.batch.size"] == 1
    # The trace context travels in the stream entry: the publish span's, W3C.
    ((_, fields),) = await stack.redis.xrange(settings.event_stream_name)
    assert set(fields) == EVENT_FIELDS | {b"traceparent"}
    assert fields[b"traceparent"] == f"00-{TRACE_ID}-{publish.context.span_id:016x}-01".encode()
    await stack.assert_converges()


async def test_a_command_the_stream_never_carried_is_a_catch_up_trace(stack: Stack) -> None:
    """Applied by the sweep from the write DB, which keeps no trace context: a root span."""
    exporter = InMemorySpanExporter()
    tracing = in_memory(exporter)
    settings = traced(stack)
    async with write_api(settings, tracing) as client:
        answer = await client.post(
            "/write", json={"key": "k", "value": "v"}, headers={"traceparent": TRACEPARENT}
        )
        assert answer.status_code == 200, answer.text
    position = answer.json()["position"]
    await stack.redis.delete(settings.event_stream_name)  # the stream lost it
    async with projector(settings, tracing):

        async def swept() -> bool:
            return any(s.name == "catch-up" for s in exporter.get_finished_spans())

        await wait_until(swept, 20, "the sweep's span")
    (catch_up,) = [s for s in exporter.get_finished_spans() if s.name == "catch-up"]
    assert catch_up.parent is None and catch_up.kind == SpanKind.INTERNAL
    assert catch_up.attributes is not None
    assert catch_up.attributes["cqrs.command.count"] == 1
    assert catch_up.attributes["cqrs.position.first"] == position
    assert not of_trace(exporter, "project")
    await stack.assert_converges()


@pytest.mark.parametrize("scripts", [True, False], ids=["eval", "xadd"])
@pytest.mark.parametrize("max_length", [0, 1000])
async def test_a_traceparent_is_a_field_only_where_given(
    redis_server: RedisServer,
    fresh_names: str,
    monkeypatch: pytest.MonkeyPatch,
    scripts: bool,
    max_length: int,
) -> None:
    monkeypatch.setattr(stream._Scripts, "refused", not scripts)
    name = f"s-{fresh_names}"
    redis = Redis.from_url(redis_server.url)
    try:
        sent = commands(3)
        await stream.publish(redis, name, sent, max_length, [TRACEPARENT, "", TRACEPARENT])
        await stream.publish(redis, name, commands(1, first=4), max_length)
        entries = [fields for _, fields in await redis.xrange(name)]
    finally:
        await redis.aclose()
    assert [set(f) - EVENT_FIELDS for f in entries] == [
        {b"traceparent"},
        set(),
        {b"traceparent"},
        set(),
    ]
    assert entries[0][b"traceparent"] == TRACEPARENT.encode()
    assert [int(f[b"position"]) for f in entries] == [1, 2, 3, 4]


# Runs a write and its projection through the in-process API and projector with TRACING
# unset, and reports the OpenTelemetry modules that loaded beyond those our libraries load of
# themselves, traced or not: FastAPI's telemetry imports the API, redis-py's observability the
# SDK's metrics (where the SDK is installed).
_UNTRACED = """
import asyncio, json, sys
import fastapi, redis.asyncio
baseline = {m for m in sys.modules if m.startswith("opentelemetry")}
import httpx
from cqrs_stack.app import create_server_app, fastapi_app
from cqrs_stack.config import Settings
from cqrs_stack.resources import close_resources, open_resources

async def main():
    settings = Settings()
    served = create_server_app(settings, "api")
    app = fastapi_app(served)
    async with app.router.lifespan_context(app):
        projector = await open_resources(settings, "projector")
        try:
            transport = httpx.ASGITransport(app=served)
            async with httpx.AsyncClient(transport=transport, base_url="http://cqrs") as client:
                headers = {"traceparent": sys.argv[1]}
                body = {"key": "k", "value": "v"}
                written = await client.post("/write", json=body, headers=headers)
                position = written.json()["position"]
                read = await client.get("/read/k", params={"position": position, "timeout": 20})
        finally:
            await close_resources(projector)
    loaded = sorted({m for m in sys.modules if m.startswith("opentelemetry")} - baseline)
    sdk = sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk.trace"))
    print(json.dumps({"statuses": [written.status_code, read.status_code], "loaded": loaded,
                      "sdk": sdk, "ours": "cqrs_stack.tracing" in sys.modules}))

asyncio.run(main())
"""


async def test_untraced_writes_load_no_tracing_and_add_no_field(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(stack.env)
    env.pop("TRACING", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _UNTRACED,
        TRACEPARENT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode()
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report == {"statuses": [200, 200], "loaded": [], "sdk": [], "ours": False}
    ((_, fields),) = await stack.redis.xrange(stack.settings.event_stream_name)
    assert set(fields) == EVENT_FIELDS  # the caller's traceparent did not travel


async def test_a_traced_process_exports_as_otel_variables_say(stack: Stack) -> None:
    """`cqrs-stack write-api` with TRACING=true and OTEL_TRACES_EXPORTER=console: the spans
    queued for export are written out by the time SIGTERM's stop is over."""
    api = await stack.launch(
        "write-api", TRACING="true", OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="w"
    )
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        answer = await client.post(
            "/write", json={"key": "k", "value": "v"}, headers={"traceparent": TRACEPARENT}
        )
    assert answer.status_code == 200, answer.text
    # uvicorn re-raises SIGTERM once its graceful shutdown is done.
    assert await asyncio.to_thread(api.terminate) in (0, -signal.SIGTERM)
    log = api.log()
    for name in ("POST /write", "commit", "publish"):
        assert f'"name": "{name}"' in log, log[-3000:]
    assert f'"trace_id": "0x{TRACE_ID}"' in log
    assert '"service.name": "w"' in log


async def test_an_exporter_it_cannot_use_is_a_configuration_error(stack: Stack) -> None:
    returncode, err = await config_error(stack, OTEL_TRACES_EXPORTER="zipkin")
    assert returncode == 2, err
    assert "OTEL_TRACES_EXPORTER='zipkin'" in err


@pytest.mark.parametrize(
    ("exporting", "stop"),
    [(False, signal.SIGTERM), (True, signal.SIGTERM), (True, signal.SIGINT)],
    # SIGINT: the process exits by unwinding (atexit, thread joins), as PID 1 of a container
    # does on SIGTERM (uvicorn re-raises it, and PID 1 ignores it).
    ids=["queued", "export-in-flight", "export-in-flight-exit-unwinds"],
)
async def test_a_hung_collector_does_not_hold_the_exit(
    stack: Stack, exporting: bool, stop: signal.Signals
) -> None:
    """A collector that takes the connection and never answers (the OTLP exporter would
    wait up to OTEL_EXPORTER_OTLP_TIMEOUT, 10 s, per export): the process still exits within
    SHUTDOWN_TIMEOUT (1 s) and a little, its spans left unexported; also when an export is
    already waiting on the collector at SIGTERM and more spans are queued behind it."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # connections complete in the backlog; what is accepted is never read
        hung.settimeout(20)
        collector = f"http://127.0.0.1:{hung.getsockname()[1]}"
        delay = {"OTEL_BSP_SCHEDULE_DELAY": "100"} if exporting else {}
        api = await stack.launch(
            "write-api",
            TRACING="true",
            OTEL_EXPORTER_OTLP_ENDPOINT=collector,
            SHUTDOWN_TIMEOUT="1",
            **delay,
        )
        accepted: list[socket.socket] = []  # kept open (never read) until the exit is over
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            answer = await client.post("/write", json={"key": "k", "value": "v"})
            assert answer.status_code == 200, answer.text
            if exporting:  # the exporter connected: its export waits on the collector
                accepted.append((await asyncio.to_thread(hung.accept))[0])
                more = await client.post("/write", json={"key": "k2", "value": "v"})
                assert more.status_code == 200, more.text
        started = time.monotonic()
        try:
            api.process.send_signal(stop)
            code = await asyncio.to_thread(api.process.wait, 30)
        finally:
            took = time.monotonic() - started
            for connection in accepted:
                connection.close()
    assert took < 6, f"the exit took {took:.1f}s:\n{api.log()[-3000:]}"
    assert code in (0, -stop), api.log()[-3000:]


def test_tracing_without_the_extra_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TRACING=true where the SDK is not installed: refused with the install line (exit 2)."""
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "opentelemetry.sdk" else found(name, *args),
    )
    with pytest.raises(ValidationError, match=r"cqrs-stack\[tracing\]"):
        Settings(tracing=True)
    assert Settings(tracing=False).tracing is False


async def test_a_collector_that_is_down_fails_no_write_and_holds_no_exit(stack: Stack) -> None:
    """Nothing listens at the collector's port (connections refused; the exporter retries
    with back-off for up to 10 s per batch): writes are answered, and a stop that unwinds
    (SIGINT, as PID 1 exits) ends within SHUTDOWN_TIMEOUT (1 s) and a little."""
    api = await stack.launch(
        "write-api",
        TRACING="true",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        OTEL_BSP_SCHEDULE_DELAY="50",
        SHUTDOWN_TIMEOUT="1",
    )
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        for i in range(10):
            answer = await client.post("/write", json={"key": f"k{i}", "value": "v"})
            assert answer.status_code == 200 and answer.json()["success"], answer.text
    started = time.monotonic()
    api.process.send_signal(signal.SIGINT)
    code = await asyncio.to_thread(api.process.wait, 30)
    took = time.monotonic() - started
    assert took < 6, f"the exit took {took:.1f}s:\n{api.log()[-3000:]}"
    assert code in (0, -signal.SIGINT), api.log()[-3000:]


async def config_error(stack: Stack, **overrides: str) -> tuple[int | None, str]:
    """`cqrs-stack write-api` with TRACING=true and ``overrides``: its exit code and stderr."""
    env = {**os.environ, **stack.env, "TRACING": "true", **overrides}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cqrs_stack.cli",
        "write-api",
        "--port",
        "0",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, err.decode()


SECRET = "s3cr3tT0kenXYZ"


@pytest.mark.parametrize(
    ("variable", "headers"),
    [
        ("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization: Bearer {SECRET}"),  # HTTP's spelling
        ("OTEL_EXPORTER_OTLP_HEADERS", f"x-api-key={SECRET};v=1"),
        ("OTEL_EXPORTER_OTLP_HEADERS", f'x-api-key="{SECRET}"'),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", f"a=b, authorization Bearer {SECRET}"),
    ],
    ids=["colon", "semicolon", "quote", "traces-variable"],
)
async def test_headers_the_exporter_cannot_parse_are_a_configuration_error_never_shown(
    stack: Stack, variable: str, headers: str
) -> None:
    """Headers for the collector that the OTLP exporter would drop with a warning echoing the
    entry: exit 2 naming the variable, and the credential nowhere in what the process wrote."""
    code, err = await config_error(
        stack, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", **{variable: headers}
    )
    assert code == 2, err
    assert f"TRACING: {variable}: not a comma-separated list of name=value" in err
    assert SECRET not in err, err


def test_header_values_are_hidden_in_every_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Header values are registered with the log redaction: the SDK's own warning about a
    malformed entry (logger opentelemetry.util.re), which echoes it, shows no credential."""
    import logging

    from opentelemetry.util.re import parse_env_headers

    from cqrs_stack.cli import RedactingFilter
    from cqrs_stack.config import known_secrets

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization: Bearer {SECRET}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", f"x-api-key=Bearer%20{SECRET}2")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.addFilter(RedactingFilter(known_secrets()))
    sdk_log = logging.getLogger("opentelemetry.util.re")
    sdk_log.addHandler(handler)
    try:
        parse_env_headers(os.environ["OTEL_EXPORTER_OTLP_HEADERS"], liberal=True)
        sdk_log.warning("sent %s", f"Bearer {SECRET}2")  # a decoded value, as sent
    finally:
        sdk_log.removeHandler(handler)
    assert len(lines) == 2 and "Header format invalid" in lines[0], lines
    assert not [line for line in lines if SECRET in line], lines


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5000"),  # past the queue's 2048
        ("OTEL_BSP_SCHEDULE_DELAY", "-1"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
    ],
)
async def test_batching_the_sdk_refuses_is_a_configuration_error(
    stack: Stack, variable: str, value: str
) -> None:
    """An OTEL_BSP_* value the SDK's BatchSpanProcessor refuses: exit 2 naming the variable,
    as other configuration errors, not exit 70 (a bug) with the SDK's ValueError."""
    code, err = await config_error(stack, OTEL_TRACES_EXPORTER="console", **{variable: value})
    assert code == 2, err
    assert f"TRACING: {variable} must be" in err, err
    assert "ValueError" not in err


# What a process takes past its stop: uvicorn notices the signal and ends its serve loop on a
# 0.1 s tick, then the interpreter exits; 0.22-0.27 s in all with TRACING off and
# SHUTDOWN_TIMEOUT=0 on a loaded 2-core machine (load average 6.6).
EXIT_SLACK = 0.5


@pytest.mark.parametrize("shutdown_timeout", [0, 1])
async def test_a_hung_collector_holds_the_stop_no_longer_than_shutdown_timeout(
    stack: Stack, shutdown_timeout: int
) -> None:
    """A collector that accepts the connection and never answers, an export waiting on it and
    spans queued behind it: from SIGTERM to the process gone takes SHUTDOWN_TIMEOUT and no
    more than the exit's slack (EXIT_SLACK), also when SHUTDOWN_TIMEOUT=0."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        hung.settimeout(20)
        api = await stack.launch(
            "write-api",
            TRACING="true",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{hung.getsockname()[1]}",
            OTEL_BSP_SCHEDULE_DELAY="50",
            SHUTDOWN_TIMEOUT=str(shutdown_timeout),
        )
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            answer = await client.post("/write", json={"key": "k", "value": "v"})
            assert answer.status_code == 200, answer.text
            accepted = (await asyncio.to_thread(hung.accept))[0]  # the export waits on it
            more = await client.post("/write", json={"key": "k2", "value": "v"})
            assert more.status_code == 200, more.text
        try:
            started = time.monotonic()
            api.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(api.process.wait, 30)
            took = time.monotonic() - started
        finally:
            accepted.close()
    assert code in (0, -signal.SIGTERM), api.log()[-3000:]
    assert took < shutdown_timeout + EXIT_SLACK, f"the stop took {took:.2f}s:\n{api.log()[-2000:]}"
