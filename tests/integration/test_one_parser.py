"""One parser for every request: the hot path and the framework answer each request alike.

Which layer serves a request (hot_paths.py or the FastAPI routes) is an implementation detail,
so every shape of request below is sent to a server with ``HOT_PATHS=true`` and to one with
``HOT_PATHS=false``: the status and the body must be the same, and the status the one decided
for that shape (README, "HTTP API"). The two servers share one stack, started once for the
module.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cqrs_stack.localservers import PostgresServer, RedisServer
from tests.fixtures.stack import Stack, open_stack

MAX_VALUE_BYTES = 1000
MAX_BODY_BYTES = 4096
VALID = b'{"key": "k", "value": "v"}'
# Fields of a successful write that differ between two writes of the same body.
VOLATILE = ("event_id", "position", "created_at")


@dataclass
class Paths:
    """Clients of the two servers, and the stack they share."""

    hot: httpx.AsyncClient
    cold: httpx.AsyncClient
    stack: Stack

    async def stored(self) -> int:
        """Commands in the write DB."""
        return int(
            await self.stack.scalar(self.stack.write_engine, "SELECT count(*) FROM commands")
        )


@pytest_asyncio.fixture(scope="module")
async def paths(
    write_pg: PostgresServer,
    read_pg: PostgresServer,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Paths]:
    names = f"parser{os.getpid()}_{uuid.uuid4().hex[:8]}"
    workdir: Path = tmp_path_factory.mktemp("one-parser")
    async with open_stack(write_pg, read_pg, redis_server, names, workdir) as stack:
        limits = {"MAX_VALUE_BYTES": str(MAX_VALUE_BYTES), "MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
        hot = await stack.launch("api", HOT_PATHS="true", **limits)
        cold = await stack.launch("api", HOT_PATHS="false", **limits)
        async with (
            httpx.AsyncClient(base_url=hot.url, timeout=10) as hot_client,
            httpx.AsyncClient(base_url=cold.url, timeout=10) as cold_client,
        ):
            yield Paths(hot_client, cold_client, stack)


def chunked(*parts: bytes) -> Callable[[], AsyncIterator[bytes]]:
    """A body sent with Transfer-Encoding: chunked (no Content-Length), one chunk per part."""

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    return body


@dataclass
class Shape:
    """One shape of request and the status decided for it."""

    status: int
    body: bytes | Callable[[], AsyncIterator[bytes]] | None = VALID
    headers: list[tuple[str, str]] = field(default_factory=list)
    method: str = "POST"
    path: str = "/write"
    error: str | None = None  # the error code of a refusal

    def content(self) -> bytes | AsyncIterator[bytes] | None:
        return self.body() if callable(self.body) else self.body


def value_of(size: int) -> bytes:
    return b'{"key": "k", "value": "' + b"x" * size + b'"}'


CT = "content-type"
SHAPES = {
    # Content types: none (or blank) and JSON types are parsed as JSON, any other is 415.
    "no-content-type": Shape(200),
    "blank-content-type": Shape(200, headers=[(CT, "")]),
    "json": Shape(200, headers=[(CT, "application/json")]),
    "json-charset": Shape(200, headers=[(CT, "application/json; charset=utf-8")]),
    "json-upper-case": Shape(200, headers=[(CT, "Application/JSON")]),
    "plus-json": Shape(200, headers=[(CT, "application/merge-patch+json")]),
    "vendor-plus-json": Shape(200, headers=[(CT, "application/vnd.api+json; charset=utf-8")]),
    "only-parameters": Shape(415, headers=[(CT, ";charset=utf-8")], error="unsupported_media_type"),
    "text-plain": Shape(415, headers=[(CT, "text/plain")], error="unsupported_media_type"),
    "text-json": Shape(415, headers=[(CT, "text/json")], error="unsupported_media_type"),
    "jsonx": Shape(415, headers=[(CT, "application/jsonx")], error="unsupported_media_type"),
    "form": Shape(
        415,
        b"key=k&value=v",
        [(CT, "application/x-www-form-urlencoded")],
        error="unsupported_media_type",
    ),
    "multipart": Shape(
        415,
        b'--x\r\nContent-Disposition: form-data; name="key"\r\n\r\nk\r\n--x--\r\n',
        [(CT, "multipart/form-data; boundary=x")],
        error="unsupported_media_type",
    ),
    # Chunked bodies (no Content-Length) are read bounded, then parsed the same way.
    "chunked-no-content-type": Shape(200, chunked(b'{"key": "k", ', b'"value": "v"}')),
    "chunked-malformed": Shape(
        400, chunked(b'{"key": "k", ', b'"value": '), error="malformed_json"
    ),
    "chunked-text-plain": Shape(
        415, chunked(VALID), [(CT, "text/plain")], error="unsupported_media_type"
    ),
    "chunked-over-body-limit": Shape(
        413, chunked(*[b"x" * 1024] * 4, b"x"), error="too_large"
    ),  # MAX_BODY_BYTES + 1
    # Limits, at the bound and one past, without a Content-Type.
    "value-at-limit": Shape(200, value_of(MAX_VALUE_BYTES)),
    "value-over-limit": Shape(413, value_of(MAX_VALUE_BYTES + 1), error="too_large"),
    "body-over-limit": Shape(413, b" " * (MAX_BODY_BYTES + 1), error="too_large"),
    # JSON that is not strict JSON (RFC 8259): 400, without a Content-Type too.
    "malformed": Shape(400, b'{"key": "k", "value": ', error="malformed_json"),
    "duplicate-keys": Shape(400, b'{"key": "a", "key": "b", "value": "v"}', error="malformed_json"),
    "nan": Shape(400, b'{"key": "k", "value": NaN}', error="malformed_json"),
    "invalid-utf8": Shape(400, b'{"key": "k", "value": "\xff"}', error="malformed_json"),
    # Valid JSON, not a write: 422.
    "empty-body": Shape(422, b"", error="invalid_request"),
    "empty-body-json": Shape(422, b"", [(CT, "application/json")], error="invalid_request"),
    "array": Shape(422, b'["k", "v"]', error="invalid_request"),
    "missing-value": Shape(422, b'{"key": "k"}', error="invalid_request"),
    "number-value": Shape(422, b'{"key": "k", "value": 5}', error="invalid_request"),
    "nul-in-key": Shape(422, b'{"key": "a\\u0000", "value": "v"}', error="invalid_request"),
    # PUT reads its body with the same parser.
    "put-no-content-type": Shape(200, method="PUT"),
    "put-text-plain": Shape(
        415, method="PUT", headers=[(CT, "text/plain")], error="unsupported_media_type"
    ),
    "put-malformed": Shape(400, b"{", method="PUT", error="malformed_json"),
    # Headers that must come once: refused on every path, reads and probes included.
    "two-content-types": Shape(
        400, headers=[(CT, "application/json"), (CT, "application/json")], error="duplicate_header"
    ),
    "two-content-types-differ": Shape(
        400, headers=[(CT, "text/plain"), (CT, "application/json")], error="duplicate_header"
    ),
    "two-content-types-cased": Shape(
        400,
        headers=[("Content-Type", "text/plain"), (CT, "application/json")],
        error="duplicate_header",
    ),
    "two-authorizations": Shape(
        400,
        headers=[("authorization", "Bearer a"), ("authorization", "Bearer b")],
        error="duplicate_header",
    ),
    "read-two-authorizations": Shape(
        400,
        None,
        [("authorization", "Bearer a"), ("authorization", "Bearer a")],
        method="GET",
        path="/read/k",
        error="duplicate_header",
    ),
    "health-two-content-types": Shape(
        400,
        None,
        [(CT, "text/plain"), (CT, "text/plain")],
        method="GET",
        path="/health",
        error="duplicate_header",
    ),
}


def comparable(answer: httpx.Response) -> dict[str, object]:
    """The answer's status, content type and JSON body, with a write's volatile fields masked."""
    body = answer.json()
    if answer.status_code == 200 and "position" in body:
        body = {k: ("<volatile>" if k in VOLATILE else v) for k, v in body.items()}
    return {
        "status": answer.status_code,
        "content-type": answer.headers.get("content-type"),
        "body": body,
    }


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
async def test_both_paths_answer_alike(paths: Paths, shape: Shape) -> None:
    before = await paths.stored()
    answers = {}
    for name, client in (("hot", paths.hot), ("cold", paths.cold)):
        request = client.build_request(
            shape.method, shape.path, content=shape.content(), headers=shape.headers
        )
        answers[name] = comparable(await client.send(request))
    assert answers["hot"] == answers["cold"]
    answer = answers["hot"]
    assert answer["status"] == shape.status, answer
    body = answer["body"]
    assert isinstance(body, dict)
    if shape.error is not None:
        assert body["success"] is False and body["error"] == shape.error, body
        assert body["message"], body
    written = 2 if shape.status == 200 and shape.path == "/write" else 0
    assert await paths.stored() == before + written


async def test_put_says_updated_on_both_paths(paths: Paths) -> None:
    # The original service's words: POST "Command written...", PUT "Command updated...".
    for client in (paths.hot, paths.cold):
        created = (await client.post("/write", json={"key": "w", "value": "1"})).json()
        updated = (await client.put("/write", json={"key": "w", "value": "2"})).json()
        assert created["message"] == "Command written and event published"
        assert updated["message"] == "Command updated and event published"
        assert updated["event_type"] == "RecordUpdated"
