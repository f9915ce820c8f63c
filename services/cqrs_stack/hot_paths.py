"""The hot routes' ordinary requests, answered without the framework's per-request work.

For every call FastAPI resolves dependencies, validates parameters into a signature and builds
Request objects: on one core that costs more than the database round trip, and it caps reads
and writes at about a third of what the HTTP server can carry. This layer answers a valid
``GET /read/{key}`` (no query), ``POST``/``PUT /write`` and ``GET /health`` directly, with the
same models and answer functions as the routes, and hands everything else (bad input,
refusals, parameters) to FastAPI, so every refusal still comes from one place and one shape.
"""

from __future__ import annotations

from typing import NamedTuple

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import dependency_error
from .events import RECORD_CREATED, RECORD_UPDATED
from .middleware import read_body, replay
from .models import MAX_KEY_LENGTH, WriteRequest, parse_json_body
from .read_api import read_answer
from .resources import Resources
from .write_api import token_accepted, write_answer

_READ_PREFIX = "/read/"
_EVENT_TYPES = {"POST": RECORD_CREATED, "PUT": RECORD_UPDATED}
_JSON_HEADERS = (b"content-type", b"application/json")


class _Route(NamedTuple):
    """What the router would have put in ``scope["route"]``, as far as metrics look at it."""

    path: str


_READ_ROUTE = _Route("/read/{key:key}")
_WRITE_ROUTE = _Route("/write")
_HEALTH_ROUTE = _Route("/health")


class HotPaths:
    """ASGI layer: serves valid reads and writes itself, passes every other request on."""

    def __init__(self, app: ASGIApp, *, reads: bool, writes: bool, health: bytes) -> None:
        self.app = app
        self.reads = reads
        self.writes = writes
        # Liveness probes come every few seconds from every kubelet: answered here, a probe
        # costs a fraction of a route's call and waits less behind a busy event loop.
        self.health = health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            method, path = scope["method"], scope["path"]
            if method == "GET" and path.startswith(_READ_PREFIX) and not scope["query_string"]:
                if self.reads and await self._read(scope, receive, send):
                    return
            elif path == "/write" and method in _EVENT_TYPES and self.writes:
                await self._write(scope, receive, send)
                return
            elif path == "/health" and method == "GET":
                scope["route"] = _HEALTH_ROUTE
                await _send_json(send, self.health)
                return
        await self.app(scope, receive, send)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bool:
        key = scope["path"][len(_READ_PREFIX) :]
        if not key or len(key) > MAX_KEY_LENGTH or "\x00" in key:
            return False  # the route's validation answers 422
        scope["route"] = _READ_ROUTE
        resources: Resources = scope["app"].state.resources
        try:
            answer = await read_answer(resources, key)
        except Exception as exc:
            await _dependency_down(exc, scope, receive, send)
            return True
        await _send_json(send, answer)
        return True

    async def _write(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        scope["route"] = _WRITE_ROUTE
        raw = await read_body(receive)
        if raw is None:
            return  # the client went away
        resources: Resources = scope["app"].state.resources
        try:
            body = WriteRequest.model_validate(parse_json_body(raw))
        except ValueError:  # malformed JSON or a validation error: the route explains it
            await self.app(scope, replay([raw], None), send)
            return
        if not token_accepted(resources.settings, _header(scope, b"authorization")):
            await self.app(scope, replay([raw], None), send)
            return
        try:
            answer = await write_answer(resources, body, _EVENT_TYPES[method])
        except HTTPException:  # a refusal before anything was stored (value too large)
            await self.app(scope, replay([raw], None), send)
            return
        except Exception as exc:
            await _dependency_down(exc, scope, receive, send)
            return
        await _send_json(send, answer.model_dump_json().encode())


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return ""


async def _dependency_down(exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
    answer = dependency_error(exc)
    if answer is None:
        raise exc
    await answer(scope, receive, send)


async def _send_json(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode()), _JSON_HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": body})
