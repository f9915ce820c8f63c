"""ASGI layers in front of the routes: request limits and metrics, then the hot paths."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .errors import error_response

_BODY_METHODS = ("POST", "PUT", "PATCH")


class RequestGuard:
    """Refuses oversized or non-JSON bodies before any route runs, and records metrics."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        status = 500
        if b"content-length" not in headers and scope["method"] in _BODY_METHODS:
            # A chunked body has no length to check up front: read it here, bounded.
            bounded = await self._bounded_body(receive)
            if bounded is None:
                await self._too_large()(scope, _no_body, send)
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

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> ASGIApp | None:
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return error_response(400, "bad_request", "Content-Length must be a number of bytes")
        if length is not None and int(length) > self.max_body_bytes:
            return self._too_large()
        if scope["method"] in ("POST", "PUT") and scope["path"] == "/write":
            content_type = headers.get(b"content-type")
            if content_type is not None and not is_json(content_type):
                given = content_type.decode("latin-1")[:100]
                return error_response(
                    415, "unsupported_media_type", f"send the body as application/json, not {given}"
                )
        return None

    def _too_large(self) -> ASGIApp:
        return error_response(413, "too_large", f"request body over {self.max_body_bytes} bytes")

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


def is_json(content_type: bytes | None) -> bool:
    """Is a Content-Type header (None: absent, as the original service accepted) JSON?"""
    if content_type is None:
        return True
    media_type = content_type.decode("latin-1").split(";")[0].strip().lower()
    return media_type in ("application/json", "")


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


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
