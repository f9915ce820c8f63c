"""One parser for every request: the hot path and the framework answer each request alike.

Which layer serves a request (hot_paths.py or the FastAPI routes) is an implementation detail,
so every shape of request below is sent to a server with ``HOT_PATHS=true`` and to one with
``HOT_PATHS=false``: the status and the body must be the same, and the status the one decided
for that shape (README, "HTTP API"). The two servers share one stack, started once for the
module.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
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
MAX_BODY_BYTES = 8192  # holds a number one digit past INT_DIGITS
VALID = b'{"key": "k", "value": "v"}'
TOKEN = "s3cret-token"
MAX_JSON_DEPTH = 512  # models.MAX_JSON_DEPTH
INT_DIGITS = 4300  # sys.get_int_max_str_digits()
# Fields of a successful write that differ between two writes of the same body.
VOLATILE = ("event_id", "position", "created_at")


@dataclass
class Paths:
    """Clients of the two servers, and the stack they share."""

    hot: httpx.AsyncClient
    cold: httpx.AsyncClient
    stack: Stack
    # The same two paths with WRITE_API_TOKEN set (to TOKEN).
    hot_guarded: httpx.AsyncClient
    cold_guarded: httpx.AsyncClient

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
        hot_guarded = await stack.launch("write-api", HOT_PATHS="true", WRITE_API_TOKEN=TOKEN)
        cold_guarded = await stack.launch("write-api", HOT_PATHS="false", WRITE_API_TOKEN=TOKEN)
        async with (
            httpx.AsyncClient(base_url=hot.url, timeout=10) as hot_client,
            httpx.AsyncClient(base_url=cold.url, timeout=10) as cold_client,
            httpx.AsyncClient(base_url=hot_guarded.url, timeout=10) as hot_guarded_client,
            httpx.AsyncClient(base_url=cold_guarded.url, timeout=10) as cold_guarded_client,
        ):
            yield Paths(hot_client, cold_client, stack, hot_guarded_client, cold_guarded_client)


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
    headers: list[tuple[str, str]] | list[tuple[bytes, bytes]] = field(default_factory=list)
    method: str = "POST"
    path: str = "/write"
    error: str | None = None  # the error code of a refusal

    def content(self) -> bytes | AsyncIterator[bytes] | None:
        return self.body() if callable(self.body) else self.body


def value_of(size: int) -> bytes:
    return b'{"key": "k", "value": "' + b"x" * size + b'"}'


def nested(depth: int) -> bytes:
    """A write whose arrays and objects nest ``depth`` levels (its own object is the first)."""
    return b'{"key": "k", "value": "v", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def number_of(digits: int) -> bytes:
    return b'{"key": "k", "value": "v", "x": ' + b"1" * digits + b"}"


def halves(body: bytes) -> Callable[[], AsyncIterator[bytes]]:
    return chunked(body[: len(body) // 2], body[len(body) // 2 :])


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
        413, chunked(*[b"x" * 1024] * (MAX_BODY_BYTES // 1024), b"x"), error="too_large"
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
    # Nesting: one explicit limit (models.MAX_JSON_DEPTH), whatever the path or framing.
    "depth-at-limit": Shape(200, nested(MAX_JSON_DEPTH)),
    "depth-over-limit": Shape(400, nested(MAX_JSON_DEPTH + 1), error="malformed_json"),
    "chunked-depth-at-limit": Shape(200, halves(nested(MAX_JSON_DEPTH))),
    "chunked-depth-over-limit": Shape(
        400, halves(nested(MAX_JSON_DEPTH + 1)), error="malformed_json"
    ),
    "brackets-in-strings": Shape(200, b'{"key": "k", "value": "' + b"[{" * 300 + b'"}'),
    # Numbers longer than Python converts: refused as JSON, never a 500.
    "number-at-digit-limit": Shape(200, number_of(INT_DIGITS)),
    "number-over-digit-limit": Shape(400, number_of(INT_DIGITS + 1), error="malformed_json"),
    "number-value-over-digit-limit": Shape(
        400, b'{"key": "k", "value": ' + b"9" * (INT_DIGITS + 1) + b"}", error="malformed_json"
    ),
    "chunked-number-over-digit-limit": Shape(
        400, halves(number_of(INT_DIGITS + 1)), error="malformed_json"
    ),
    # UTF-8 only (a UTF-8 byte order mark is ignored): no UTF-16/32, no encoded surrogates.
    "utf8-bom": Shape(200, b"\xef\xbb\xbf" + VALID),
    "utf16": Shape(400, VALID.decode().encode("utf-16"), error="malformed_json"),
    "utf16-no-bom": Shape(400, VALID.decode().encode("utf-16-le"), error="malformed_json"),
    "utf32": Shape(400, VALID.decode().encode("utf-32"), error="malformed_json"),
    "cesu8-surrogate-in-value": Shape(
        400, b'{"key": "k", "value": "\xed\xa0\x80"}', error="malformed_json"
    ),
    "cesu8-surrogate-in-key": Shape(
        400, b'{"key": "\xed\xa0\x80", "value": "v"}', error="malformed_json"
    ),
    "cesu8-surrogate-in-field-name": Shape(
        400, b'{"key": "k", "value": "v", "\xed\xa0\x80": 1}', error="malformed_json"
    ),
    # Whitespace around a Content-Type is space and tab (RFC 9110 OWS), not a no-break space.
    "json-nbsp": Shape(
        415, headers=[(CT.encode(), b"application/json\xa0")], error="unsupported_media_type"
    ),
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
    # Other methods and routes: every error body has the same four fields, a 405 its Allow.
    "get-write": Shape(405, None, method="GET", error="method_not_allowed"),
    "delete-write": Shape(405, None, method="DELETE", error="method_not_allowed"),
    "post-read": Shape(405, method="POST", path="/read/k", error="method_not_allowed"),
    "head-read": Shape(405, None, method="HEAD", path="/read/k"),
    "head-health": Shape(405, None, method="HEAD", path="/health"),
    "not-found": Shape(404, None, method="GET", path="/nowhere", error="not_found"),
    # A body on a GET is bounded as a write's: 413 past the limit, chunked or not.
    "read-body-at-limit": Shape(200, b"x" * MAX_BODY_BYTES, method="GET", path="/read/k"),
    "read-body-over-limit": Shape(
        413, b"x" * (MAX_BODY_BYTES + 1), method="GET", path="/read/k", error="too_large"
    ),
    "read-chunked-body-at-limit": Shape(
        200, chunked(*[b"x" * 1024] * (MAX_BODY_BYTES // 1024)), method="GET", path="/read/k"
    ),
    "read-chunked-body-over-limit": Shape(
        413,
        chunked(*[b"x" * 1024] * (MAX_BODY_BYTES // 1024), b"x"),
        method="GET",
        path="/read/k",
        error="too_large",
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
    """The answer's status, content type, Allow and JSON body, a write's volatile fields masked.

    A read's counts are masked too: the two paths count the same key.
    """
    body = answer.json() if answer.content else None
    if answer.status_code == 200 and isinstance(body, dict):
        masked = (*VOLATILE, "read_count", "write_count", "updated_at")
        body = {k: ("<volatile>" if k in masked else v) for k, v in body.items()}
    return {
        "status": answer.status_code,
        "content-type": answer.headers.get("content-type"),
        "allow": answer.headers.get("allow"),
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
    if shape.status == 405:
        assert answer["allow"] == ("POST, PUT" if shape.path == "/write" else "GET"), answer
    if shape.method == "HEAD":
        return  # no body
    body = answer["body"]
    assert isinstance(body, dict)
    if shape.error is not None:
        # README: every error body is {success: false, error, message, detail}.
        assert body.keys() == {"success", "error", "message", "detail"}, body
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


@dataclass
class RawAnswer:
    """An HTTP/1.1 answer read off a socket."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    continued: bool  # a 100 Continue came first

    def json(self) -> object:
        return json.loads(self.body)


async def exchange(
    client: httpx.AsyncClient, head: bytes, rest: bytes = b"", *, after_continue: bool = False
) -> RawAnswer:
    """Send ``head`` then ``rest`` on a new connection and read the final answer.

    With ``after_continue``, ``rest`` is sent only once the server said ``100 Continue`` (that
    is: once the request's handler asked for its body), unless it answered at once.
    """
    port = client.base_url.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        continued = False
        if after_continue:
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            continued = first.startswith(b"HTTP/1.1 100")
            if not continued:
                return _parse(first + await asyncio.wait_for(reader.read(), 10), False)
        writer.write(rest)
        return _parse(await asyncio.wait_for(reader.read(), 10), continued)
    finally:
        writer.close()


def _parse(data: bytes, continued: bool) -> RawAnswer:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(int(status_line.split()[1]), headers, body, continued)


def chunked_write(headers: bytes, trailers: bytes = b"", key: bytes = b"trailer") -> bytes:
    """A chunked POST /write; ``headers`` and ``trailers`` are CRLF-terminated field lines."""
    body = b'{"key": "' + key + b'", "value": "v"}'
    return (
        b"POST /write HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n" + headers + b"\r\n"
        b"%x\r\n%s\r\n0\r\n" % (len(body), body) + trailers + b"\r\n"
    )


RIGHT = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
WRONG = b"Authorization: Bearer wrong\r\n"
# Trailer fields are no headers (RFC 9110 §6.5.1): whatever a trailer says, the answer is the
# one its header section gets.
TRAILERS = {
    "token-only-in-trailer": (b"", RIGHT, 401),
    "wrong-token-right-trailer": (WRONG, RIGHT, 401),
    "right-token-wrong-trailer": (RIGHT, WRONG, 200),
    "right-token-same-trailer": (RIGHT, RIGHT, 200),
    "json-then-text-trailer": (
        RIGHT + b"Content-Type: application/json\r\n",
        b"Content-Type: text/plain\r\n",
        200,
    ),
    "text-then-json-trailer": (
        RIGHT + b"Content-Type: text/plain\r\n",
        b"Content-Type: application/json\r\n",
        415,
    ),
    # httptools itself refuses a Content-Length trailer (plain text 400, before any route).
    "length-trailer": (RIGHT, b"Content-Length: 5\r\n", 400),
}


@pytest.mark.parametrize("delayed", [False, True], ids=["at-once", "delayed"])
@pytest.mark.parametrize(("headers", "trailers", "status"), TRAILERS.values(), ids=TRAILERS.keys())
async def test_trailers_are_not_headers(
    paths: Paths, headers: bytes, trailers: bytes, status: int, delayed: bool
) -> None:
    # Delayed: the body and its trailers are sent once the handler asks for the body (after
    # the duplicate-header and token checks ran), so a late trailer cannot slip past them.
    expect = b"Expect: 100-continue\r\n" if delayed else b""
    request = chunked_write(expect + headers, trailers)
    head, _, rest = request.partition(b"\r\n\r\n")
    before = await paths.stored()
    answers = []
    for client in (paths.hot_guarded, paths.cold_guarded):
        if delayed:
            answer = await exchange(client, head + b"\r\n\r\n", rest, after_continue=True)
        else:
            answer = await exchange(client, request)
        answers.append((answer.status, answer.headers.get(b"content-type")))
        assert answer.status == status, answer
    assert answers[0] == answers[1]
    assert await paths.stored() == before + (2 if status == 200 else 0)


@pytest.mark.parametrize("path", ["hot", "cold"])
async def test_a_wrong_token_is_refused_before_the_body(paths: Paths, path: str) -> None:
    # No 100 Continue: a client without the token is not asked for its body, which is not read.
    client = paths.hot_guarded if path == "hot" else paths.cold_guarded
    head = (
        b"POST /write HTTP/1.1\r\nHost: t\r\nConnection: close\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n" % len(VALID) + WRONG + b"\r\n"
    )
    answer = await exchange(client, head, VALID, after_continue=True)
    assert not answer.continued
    assert answer.status == 401, answer
    assert answer.headers[b"www-authenticate"].startswith(b"Bearer")
    chunked_head = chunked_write(b"Expect: 100-continue\r\n" + WRONG).partition(b"\r\n\r\n")[0]
    answer = await exchange(client, chunked_head + b"\r\n\r\n", b"", after_continue=True)
    assert not answer.continued and answer.status == 401, answer


TOKENS = {
    "as-given": (b"Bearer " + TOKEN.encode(), 200),
    "scheme-any-case": (b"bEARER " + TOKEN.encode(), 200),
    "two-spaces": (b"Bearer  " + TOKEN.encode(), 200),
    "trailing-whitespace": (b"Bearer " + TOKEN.encode() + b" \t", 200),
    "prefix": (b"Bearer " + TOKEN.encode()[:-1], 401),
    "longer": (b"Bearer " + TOKEN.encode() + b"x", 401),
    "nbsp-after": (b"Bearer " + TOKEN.encode() + b"\xa0", 401),
    "tab-separator": (b"Bearer\t" + TOKEN.encode(), 401),
    "no-scheme": (TOKEN.encode(), 401),
    "basic": (b"Basic " + TOKEN.encode(), 401),
    "empty": (b"", 401),
}


@pytest.mark.parametrize(("authorization", "status"), TOKENS.values(), ids=TOKENS.keys())
async def test_token_is_compared_as_sent(paths: Paths, authorization: bytes, status: int) -> None:
    answers = []
    for client in (paths.hot_guarded, paths.cold_guarded):
        head = (
            b"POST /write HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            b"Content-Length: %d\r\nAuthorization: %s\r\n\r\n" % (len(VALID), authorization)
        )
        answer = await exchange(client, head + VALID)
        body = answer.json()
        assert isinstance(body, dict)
        if status != 200:
            assert body.keys() == {"success", "error", "message", "detail"}, body
            answers.append(body)
        assert answer.status == status, body
    assert answers == [] or answers[0] == answers[1]


_REQUEST_COUNT = re.compile(r"^cqrs_http_requests_total\{(.*)\} (\S+)$", re.MULTILINE)


async def request_counts(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {labels: float(n) for labels, n in _REQUEST_COUNT.findall(text)}


async def test_metrics_count_requests_alike(paths: Paths) -> None:
    # The same requests, answered by either path, are counted under the same labels.
    requests = [
        ("POST", "/write", VALID),
        ("POST", "/write", b"{"),
        ("POST", "/write", b'{"key": 1}'),
        ("POST", "/write", number_of(INT_DIGITS + 1)),
        ("POST", "/write", nested(MAX_JSON_DEPTH + 1)),
        ("POST", "/write", value_of(MAX_VALUE_BYTES + 1)),
        ("POST", "/write", b" " * (MAX_BODY_BYTES + 1)),
        ("GET", "/read/k", None),
        ("GET", "/read/k?position=1", None),
        ("GET", "/health", None),
        ("GET", "/nowhere", None),
        ("DELETE", "/write", None),
    ]
    counted = []
    for client in (paths.hot, paths.cold):
        before = await request_counts(client)
        for method, path, body in requests:
            await client.request(method, path, content=body)
        after = await request_counts(client)
        counted.append(
            {
                labels: n - before.get(labels, 0)
                for labels, n in after.items()
                if n != before.get(labels, 0) and "/metrics" not in labels
            }
        )
    assert counted[0] == counted[1]
    assert sum(counted[0].values()) == len(requests)


FRAMING = {
    "two-lengths": b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(VALID), len(VALID)),
    "length-and-chunked": b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(VALID),
    "signed-length": b"Content-Length: +%d\r\n" % len(VALID),
}


@pytest.mark.parametrize("framing", FRAMING.values(), ids=FRAMING.keys())
async def test_ambiguous_framing_is_refused_by_the_server(paths: Paths, framing: bytes) -> None:
    # README: refused by uvicorn before any of our code, the same on both paths.
    request = b"POST /write HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + framing + b"\r\n"
    before = await paths.stored()
    for client in (paths.hot, paths.cold):
        answer = await exchange(client, request + VALID)
        assert answer.status == 400, answer
        assert answer.body == b"Invalid HTTP request received.", answer
    assert await paths.stored() == before
