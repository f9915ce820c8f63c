"""ASGI layers in front of the routes: request limits and metrics, then the hot paths."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .errors import DuplicateHeader, RequestRefused, TooLarge

_BODY_METHODS = ("POST", "PUT", "PATCH")
# Headers whose copies could be read differently by two layers (first or last wins).
_SINGLE_HEADERS = frozenset(
    {
        b"authorization",
        b"content-type",
        b"content-length",
        b"idempotency-key",
        b"if-match",
        b"if-none-match",
    }
)


class RequestGuard:
    """Refuses ambiguous headers and oversized bodies before any route runs; records metrics."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            headers = single_headers(scope["headers"])
            check_length(headers, self.max_body_bytes)
        except RequestRefused as refused:
            await refused.response()(scope, receive, send)
            metrics.observe_request("unmatched", scope["method"], refused.status, started)
            return
        status = 500
        if b"content-length" not in headers and scope["method"] in _BODY_METHODS:
            # A chunked body has no length to check up front: it is counted as the route reads
            # it, so that a write without its token is refused (401) before it is read.
            receive = self._bounded(receive)
        elif b"content-length" not in headers and b"transfer-encoding" in headers:
            # No route reads the body of a GET: read it here, bounded, as its length would be.
            bounded = await self._bounded_body(receive)
            if bounded is None:
                await _too_large(self.max_body_bytes).response()(scope, no_body, send)
                metrics.observe_request("unmatched", scope["method"], 413, started)
                return
            receive = bounded

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.observe_request(path, scope["method"], status, started)

    def _bounded(self, receive: Receive) -> Receive:
        """A ``receive`` that raises ``TooLarge`` (413) once the body passes the limit."""
        size = 0

        async def bounded() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)
            return message

        return bounded

    async def _bounded_body(self, receive: Receive) -> Receive | None:
        """Read the whole body if it fits the limit and return a receive that replays it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return replay([], message)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return replay([b"".join(chunks)], None)


def single_headers(raw: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The request's headers by name; ``DuplicateHeader`` when one that must be single repeats.

    Two ``Authorization`` or ``Content-Type`` headers are ambiguous: one layer would keep the
    first, another the last (a proxy, a log, the hot path, the routes), and a wrong token
    followed by the right one must not pass anywhere. So none of them is chosen: 400.
    """
    headers = dict(raw)  # names come in lower case from the server
    if len(headers) != len(raw):  # some name repeats: rare, so only then look at which
        seen: set[bytes] = set()
        for name, _ in raw:
            if name in seen and name in _SINGLE_HEADERS:
                raise DuplicateHeader(
                    f"the {name.decode('latin-1')} header came more than once; send it once"
                )
            seen.add(name)
    return headers


def check_length(headers: dict[bytes, bytes], max_body_bytes: int) -> None:
    """Refuse a Content-Length that is not a number (400) or is over ``max_body_bytes`` (413)."""
    length = headers.get(b"content-length")
    if length is None:
        return
    if not length.isdigit():
        raise RequestRefused("Content-Length must be a number of bytes")
    if int(length) > max_body_bytes:
        raise _too_large(max_body_bytes)


def _too_large(max_body_bytes: int) -> TooLarge:
    return TooLarge(f"request body over {max_body_bytes} bytes")


def replay(chunks: list[bytes], final: Message | None) -> Receive:
    """A ``receive`` that hands out a body already read (then ``final``, then disconnect)."""
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


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def no_body() -> Message:
    """A ``receive`` for an answer that reads no body: the client is gone."""
    return {"type": "http.disconnect"}
