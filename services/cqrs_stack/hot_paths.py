"""The process's ASGI entry: ordinary hot requests answered without the framework's work.

For every call FastAPI resolves dependencies, validates parameters into a signature, builds
Request objects and passes through its middleware stack: on one core that costs more than the
database round trip, and it capped reads and writes at about a third of what the HTTP server
can carry. This layer, in front of the FastAPI app, answers a valid ``GET /read/{key}`` (no
query), ``POST``/``PUT /write`` and ``GET /health`` directly, with the same models and answer
functions as the routes, and reads a write's body with the routes' one parser
(``models.parse_write_request``). Everything else (bad input, refusals, duplicate headers,
chunked bodies, other routes, parameters) goes to the app, so every refusal still comes from
one place and has one shape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from . import metrics
from .errors import DuplicateHeader, RequestRefused, dependency_error
from .events import RECORD_CREATED, RECORD_UPDATED
from .middleware import no_body, read_body, replay, single_headers
from .models import MAX_KEY_LENGTH, WriteRequest, parse_write_request
from .read_api import answer_of
from .resources import Resources
from .write_api import parse_write_headers, token_accepted, write_answer

_READ_PREFIX = "/read/"
_HISTORY_SUFFIX = "/history"
_EVENT_TYPES = {"POST": RECORD_CREATED, "PUT": RECORD_UPDATED}
_JSON_HEADERS = (b"content-type", b"application/json")
# Route templates, as the app's request metrics label them.
_READ_ROUTE, _WRITE_ROUTE, _HEALTH_ROUTE = "/read/{key:key}", "/write", "/health"


class HotPaths:
    """Serves valid reads, writes and liveness probes itself; passes every other request on."""

    def __init__(
        self, app: FastAPI, *, reads: bool, writes: bool, health: bytes, max_body_bytes: int
    ) -> None:
        self.app = app
        self.reads = reads
        self.writes = writes
        # Liveness probes come every few seconds from every kubelet: answered here, a probe
        # costs a fraction of a route's call and waits less behind a busy event loop.
        self.health = health
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            if await self._answer(scope, receive, send):
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer a hot request; False (nothing received, nothing sent) leaves it to the app."""
        started = time.perf_counter()
        try:
            headers = single_headers(scope["headers"])
        except DuplicateHeader:
            return False  # the app's RequestGuard refuses it, as on every path
        method, path = scope["method"], scope["path"]
        has_body = b"content-length" in headers or b"transfer-encoding" in headers
        if method == "GET" and not scope["query_string"] and not has_body:
            if path == "/health":
                await _send_json(send, self.health)
                metrics.observe_request(_HEALTH_ROUTE, method, 200, started)
                return True
            key = path[len(_READ_PREFIX) :]
            # GET /read/{key}/history is the app's (the history read model's route).
            history = path.endswith(_HISTORY_SUFFIX)
            if self.reads and path.startswith(_READ_PREFIX) and _valid_key(key) and not history:
                await self._read(key, scope, send, started)
                return True
        elif path == "/write" and method in _EVENT_TYPES and self.writes:
            if self._length_in_bounds(headers):
                written = self._write(scope, receive, send, headers)
                passed_on = await self._counted(_WRITE_ROUTE, method, started, written)
                if passed_on is not None:  # the app answers (and counts) it
                    await self.app(scope, passed_on, send)
                return True
        return False

    async def _counted(
        self, route: str, method: str, started: float, answer: Awaitable[int | Receive | None]
    ) -> Receive | None:
        """Await our own ``answer`` and count it: its status, or 500 for an error it raised.

        An error goes on up to the server, which answers 500 as the framework would; counted
        here as the app's RequestGuard counts one, so /metrics agrees on both paths. What the
        answer hands back for the app (a ``receive``) is not counted: the app counts it.
        """
        try:
            outcome = await answer
        except Exception:
            metrics.observe_request(route, method, 500, started)
            raise
        if isinstance(outcome, int):
            metrics.observe_request(route, method, outcome, started)
            return None
        return outcome

    async def _read(self, key: str, scope: Scope, send: Send, started: float) -> None:
        """Answer a read of ``key`` and count it, as ``_counted`` would (500 for an error it
        raises): written out, as a read is the most frequent request (one frame less)."""
        records = self.app.state.resources.records
        try:
            try:
                found = await records.get(key)
            except Exception as exc:
                status = await _dependency_down(exc, scope, send)
            else:
                answer, version = answer_of(key, found, None)
                await _send_json(send, answer, _etag(version))
                status = 200
        except Exception:
            metrics.observe_request(_READ_ROUTE, "GET", 500, started)
            raise
        metrics.observe_request(_READ_ROUTE, "GET", status, started)

    async def _write(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]
    ) -> int | Receive | None:
        """Answer a write (its status); or the ``receive`` for the app to answer it; or None
        when the client went away."""
        resources: Resources = self.app.state.resources
        if not token_accepted(resources.settings, headers.get(b"authorization", b"")):
            # The route's 401 comes before the body is read, as for every write: a client
            # without the token is not told to send it (100 Continue), nor is it buffered.
            return receive
        raw = await read_body(receive)
        if raw is None:
            return None  # the client went away
        body = _parsed_body(headers, raw)
        if body is None:  # the route refuses it, with the same parser
            return replay([raw], None)
        try:
            safe = parse_write_headers(headers)
        except RequestRefused:  # the route refuses it, with the same parser
            return replay([raw], None)
        try:
            answer = await write_answer(resources, body, _EVENT_TYPES[scope["method"]], safe)
        except HTTPException:  # a refusal before anything was stored (value too large)
            return replay([raw], None)
        except RequestRefused as refused:  # settled by the write DB (412, 422): answered here
            await refused.response()(scope, no_body, send)
            return refused.status
        except Exception as exc:
            return await _dependency_down(exc, scope, send)
        extra = [(name.encode(), value.encode()) for name, value in answer.headers.items()]
        await _send_json(send, answer.json(), extra)
        return 200

    def _length_in_bounds(self, headers: dict[bytes, bytes]) -> bool:
        """A body the app's RequestGuard would let through: a length, in bounds.

        A chunked body (no length) goes to the app, whose guard reads it bounded; its route
        then parses it with the same ``parse_write_request``.
        """
        length = headers.get(b"content-length", b"")
        return length.isdigit() and int(length) <= self.max_body_bytes


def _parsed_body(headers: dict[bytes, bytes], raw: bytes) -> WriteRequest | None:
    """The write's body when the route would take it, else None."""
    content_type = headers.get(b"content-type")
    try:
        return parse_write_request(
            None if content_type is None else content_type.decode("latin-1"), raw
        )
    except RequestRefused:
        return None


def _valid_key(key: str) -> bool:
    # The route's own constraints; a key outside them is left to the route's 422.
    return 0 < len(key) <= MAX_KEY_LENGTH and "\x00" not in key


async def _dependency_down(exc: Exception, scope: Scope, send: Send) -> int:
    """Answer 503 for a dependency's failure; any other error is raised again (a 500)."""
    answer = dependency_error(exc)
    if answer is None:
        raise exc
    await answer(scope, no_body, send)
    return answer.status_code


def _etag(version: int | None) -> list[tuple[bytes, bytes]]:
    return [] if version is None else [(b"etag", b'"%d"' % version)]


async def _send_json(
    send: Send, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-length", str(len(body)).encode()), _JSON_HEADERS]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
