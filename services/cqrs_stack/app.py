"""The FastAPI application factory: one app per process role, sharing the operational routes."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Scope

from . import __version__, diagnosis, errors, figures, metrics, read_api, write_api
from .config import Settings
from .errors import (
    InvalidRequest,
    RequestRefused,
    dependency_error,
    describe_errors,
    error_response,
)
from .hot_paths import HotPaths
from .middleware import RequestGuard
from .models import ErrorResponse, HealthResponse, ReadinessResponse, StatsResponse
from .resources import (
    Resources,
    Role,
    close_resources,
    open_resources,
    serves_reads,
    serves_writes,
)

if TYPE_CHECKING:  # imported only with TRACING on (tracing.py loads OpenTelemetry)
    from .tracing import Tracing


def create_app(settings: Settings, role: Role, tracing: Tracing | None = None) -> FastAPI:
    """Build the app of ``role``: "write-api", "read-api", "api" (both) or "projector"; its
    writes and projections traced with ``tracing``, if given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.resources = await open_resources(settings, role, tracing)
        # What exists now lives until exit: frozen, it is never scanned again, so a full
        # collection under load walks only request garbage, not every object of start-up.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await close_resources(app.state.resources)

    # /docs and /redoc load Swagger UI and ReDoc from the package (fastapi-offline), not a CDN:
    # the docs work on a machine without internet access.
    app = FastAPIOffline(
        title=f"cqrs-stack {role}",
        version=__version__,
        description="CQRS key-value store: commands in PostgreSQL, events in Redis Streams.",
        lifespan=lifespan,
        static_url="/docs-assets",
        # Swagger UI would send the description to validator.swagger.io for a badge.
        swagger_ui_parameters={"validatorUrl": None},
        # Traced, every request is one server span of ours (tracing.ServerSpans), on the hot
        # paths and the framework's alike: FastAPI's own would be a second one.
        telemetry={"tracing": False} if tracing is not None else None,
    )
    if serves_writes(role):
        app.include_router(write_api.router)
    else:
        _refuse_elsewhere(
            app, role, "/write", "POST/PUT /write", "the write API (write-api or api)"
        )
    if serves_reads(role):
        app.include_router(read_api.router)
    else:
        _refuse_elsewhere(
            app, role, "/read/{key:key}", "GET /read/{key}", "the read API (read-api or api)"
        )
    _add_operational_routes(app, role)
    _add_index(app, role)
    _add_error_handlers(app)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    return app


def create_server_app(settings: Settings, role: Role, tracing: Tracing | None = None) -> ASGIApp:
    """What the HTTP server runs: the app of ``role``, behind the hot-path layer (HOT_PATHS),
    and with TRACING on behind server spans (traced by ``tracing``, else as OTEL_* say)."""
    if settings.tracing and tracing is None:
        tracing = start_tracing(settings, role)
    app = create_app(settings, role, tracing)
    served: ASGIApp = app
    if settings.hot_paths:
        served = HotPaths(
            app,
            reads=serves_reads(role),
            writes=serves_writes(role),
            health=_health(role).model_dump_json().encode(),
            max_body_bytes=settings.max_body_bytes,
        )
    return served if tracing is None else tracing.server_spans(served)


def start_tracing(settings: Settings, role: Role) -> Tracing:
    """The process's tracing (TRACING on): the one place that imports our tracing module."""
    from .tracing import start_tracing

    return start_tracing(settings, role)


def fastapi_app(served: ASGIApp) -> FastAPI:
    """The FastAPI app inside what ``create_server_app`` returned."""
    app = served
    while not isinstance(app, FastAPI):
        app = app.app  # type: ignore[attr-defined]  # the layers in front keep it as .app
    return app


def begin_stop(served: ASGIApp) -> None:
    """The server stops taking requests: begin the bounded stop of ``served``'s resources."""
    app = fastapi_app(served)
    resources: Resources | None = getattr(app.state, "resources", None)
    if resources is not None:
        resources.begin_stop()


def _resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


def _health(role: Role) -> HealthResponse:
    return HealthResponse(service=f"cqrs-stack-{role}", version=__version__)


def _refuse_elsewhere(app: FastAPI, role: Role, path: str, what: str, where: str) -> None:
    """Answer a route of the other side 405 with an empty ``Allow``, saying where it lives.

    RFC 9110 §10.2.1: an empty Allow means the resource allows no methods, as when it is
    disabled by configuration, which is what a split role is (a 404 read as "no such API").
    """
    message = f"{what} is not served by this {role} process; use {where}"

    async def elsewhere(request: Request) -> Response:
        return error_response(405, "method_not_allowed", message, headers={"Allow": ""})

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # Route's default: GET
    app.router.routes.append(Route(path, elsewhere, methods=methods, include_in_schema=False))


def _add_index(app: FastAPI, role: Role) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> dict[str, Any]:
        """What this process serves, for a person who opens its address."""
        # The OpenAPI description is the one list of what this process serves.
        endpoints = [
            f"{method.upper()} {path}"
            for path, operations in app.openapi()["paths"].items()
            for method in operations
        ]
        return {
            "service": f"cqrs-stack-{role}",
            "version": __version__,
            "docs": "/docs",
            "openapi": "/openapi.json",
            "endpoints": endpoints,
        }


def _add_operational_routes(app: FastAPI, role: Role) -> None:
    @app.get("/health", response_model=HealthResponse, tags=["operations"])
    async def health() -> HealthResponse:
        """Liveness: answers as long as the event loop runs; touches no dependency."""
        return _health(role)

    @app.get(
        "/ready",
        response_model=ReadinessResponse,
        tags=["operations"],
        responses={503: {"model": ReadinessResponse}},
    )
    async def ready(request: Request) -> Response:
        """Readiness: 200 when the dependencies this role needs answer, 503 otherwise."""
        resources = _resources(request)
        checks = await resources.readiness()
        ok = all(checks.get(name) == "ok" for name in resources.required_checks())
        body = ReadinessResponse(status="ready" if ok else "not ready", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get(
        "/stats",
        response_model=StatsResponse,
        tags=["operations"],
        responses={503: {"model": ErrorResponse}},
    )
    async def stats(request: Request) -> Any:
        """Counts, publishing and projection lag, computed from durable state, and ``health``:
        why the projection is behind (diagnosis.py). When a database does not answer, the
        503's ``detail.health`` still names what refused."""
        resources = _resources(request)
        engines = (resources.write_engine, resources.read_engine)
        health = await diagnosis.diagnose(*engines, resources.redis, resources.settings)
        if health.read_db_error is not None:
            # The figures read the read DB too: it refused or did not answer just now, so
            # answer at once rather than wait on it a second time.
            return error_response(
                503,
                "database_unavailable",
                "the database is unavailable; retry later",
                {"health": health.as_dict()},
            )
        try:
            found = await figures.stack_figures(
                *engines, resources.redis, resources.settings, health
            )
        except (DBAPIError, OSError) as exc:
            return dependency_error(exc, {"health": health.as_dict()})
        return {**found, "health": health.as_dict()}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_endpoint() -> Response:
        """Prometheus metrics of this process."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _allowed_methods(request: Request) -> str:
    """Every method the request's path accepts, over all routes (a route match may be PARTIAL)."""
    return ", ".join(sorted(_methods_of(request.app.router.routes, request.scope)))


def _methods_of(routes: Iterable[BaseRoute], scope: Scope) -> set[str]:
    methods: set[str] = set()
    for route in routes:
        if route.matches(scope)[0] == Match.NONE:
            continue
        # An included router (FastAPI's include_router) holds its routes in the original one.
        inner = getattr(route, "original_router", None)
        if inner is not None:
            methods |= _methods_of(inner.routes, scope)
        else:
            methods |= getattr(route, "methods", None) or set()
    return methods


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Path and query parameters (a write's body is read by models.parse_write_request).
        errors = [
            {k: v for k, v in err.items() if k in ("type", "loc", "msg")} for err in exc.errors()
        ]
        return InvalidRequest(describe_errors(errors), errors).response()

    @app.exception_handler(RequestRefused)
    async def refused(request: Request, exc: RequestRefused) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {
            401: "unauthorized",
            404: "not_found",
            405: "method_not_allowed",
            413: "too_large",
            415: "unsupported_media_type",
        }
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # RFC 9110: a 405 lists every method of the path (POST and PUT /write are two routes).
            headers["Allow"] = _allowed_methods(request)
        error = names.get(exc.status_code, "http_error")
        return error_response(exc.status_code, error, str(exc.detail), headers=headers)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(OSError)
    @app.exception_handler(RedisError)
    @app.exception_handler(errors.RetryLater)
    async def dependency_down(request: Request, exc: Exception) -> JSONResponse:
        answer = dependency_error(exc)
        assert answer is not None  # registered only for the exceptions it maps
        return answer
