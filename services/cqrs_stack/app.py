"""The FastAPI application factory: one app per process role, sharing the operational routes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, figures, metrics, read_api, write_api
from .config import Settings
from .models import ErrorResponse, HealthResponse, ReadinessResponse, StatsResponse
from .resources import Resources, Role, close_resources, open_resources


def create_app(settings: Settings, role: Role) -> FastAPI:
    """Build the app of ``role``: "write-api", "read-api", "api" (both) or "projector"."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.resources = await open_resources(settings, role)
        try:
            yield
        finally:
            await close_resources(app.state.resources)

    app = FastAPI(
        title=f"cqrs-stack {role}",
        version=__version__,
        description="CQRS key-value store: commands in PostgreSQL, events in Redis Streams.",
        lifespan=lifespan,
    )
    if role in ("write-api", "api"):
        app.include_router(write_api.router)
    if role in ("read-api", "api"):
        app.include_router(read_api.router)
    _add_operational_routes(app, role)
    _add_error_handlers(app)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    return app


def _resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


def _add_operational_routes(app: FastAPI, role: Role) -> None:
    @app.get("/health", response_model=HealthResponse, tags=["operations"])
    async def health() -> HealthResponse:
        """Liveness: answers as long as the event loop runs; touches no dependency."""
        return HealthResponse(service=f"cqrs-stack-{role}", version=__version__)

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
    async def stats(request: Request) -> dict[str, Any]:
        """Counts, publishing and projection lag, computed from durable state."""
        resources = _resources(request)
        return await figures.stack_figures(
            resources.write_engine, resources.read_engine, resources.redis, resources.settings
        )

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_endpoint() -> Response:
        """Prometheus metrics of this process."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _error(
    status: int,
    error: str,
    message: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"success": False, "error": error, "message": message}
    if detail is not None:
        body["detail"] = jsonable_encoder(detail)
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query"))
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _allowed_methods(request: Request) -> str:
    """Every method the request's path accepts, over all routes (a route match may be PARTIAL)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {k: v for k, v in err.items() if k in ("type", "loc", "msg")} for err in exc.errors()
        ]
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                why = (err.get("ctx") or {}).get("error", "")
                return _error(400, "malformed_json", f"the body is not valid JSON: {why}", errors)
        return _error(422, "invalid_request", _describe(errors), errors)

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
        return _error(exc.status_code, error, str(exc.detail), headers=headers)

    @app.exception_handler(DBAPIError)
    async def database_down(request: Request, exc: DBAPIError) -> JSONResponse:
        return _error(503, "database_unavailable", "the database is unavailable; retry later")

    @app.exception_handler(OSError)
    async def unreachable(request: Request, exc: OSError) -> JSONResponse:
        return _error(503, "dependency_unavailable", "a dependency is unreachable; retry later")

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> JSONResponse:
        return _error(503, "redis_unavailable", "Redis is unavailable; retry later")


class RequestGuard:
    """ASGI middleware: refuses oversized or non-JSON bodies early and records metrics."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        chunked = b"content-length" not in dict(scope.get("headers") or [])
        if chunked and scope["method"] in ("POST", "PUT", "PATCH"):
            # A chunked body has no length to check up front: read it here, bounded.
            bounded = await self._bounded_body(receive)
            if bounded is None:
                status = 413
                await self._too_large()(scope, _no_body, send)
            else:
                receive = bounded

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if status != 413:
            await self.app(scope, receive, send_status)
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.REQUESTS.labels(path, scope["method"], str(status)).inc()
        metrics.REQUEST_SECONDS.labels(path, scope["method"]).observe(time.perf_counter() - started)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return _error(400, "bad_request", "Content-Length must be a number of bytes")
        if length is not None and int(length) > self.max_body_bytes:
            return self._too_large()
        if scope["method"] in ("POST", "PUT") and scope["path"] == "/write":
            content_type = headers.get(b"content-type", b"application/json").decode("latin-1")
            if content_type.split(";")[0].strip().lower() not in ("application/json", ""):
                return _error(
                    415,
                    "unsupported_media_type",
                    f"send the body as application/json, not {content_type[:100]}",
                )
        return None

    def _too_large(self) -> JSONResponse:
        return _error(413, "too_large", f"request body over {self.max_body_bytes} bytes")

    async def _bounded_body(self, receive: Receive) -> Receive | None:
        """Read the whole body if it fits the limit and return a receive that replays it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([], message)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return _replay([b"".join(chunks)], None)


def _replay(chunks: list[bytes], final: Message | None) -> Receive:
    pending: list[Message] = [
        {"type": "http.request", "body": c, "more_body": False} for c in chunks
    ]
    if final is not None:
        pending.append(final)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        return {"type": "http.disconnect"}

    return receive


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
