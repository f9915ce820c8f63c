"""Bad input (DESIGN §2): a clear 4xx with a JSON body naming the problem, and nothing stored."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from tests.fixtures.stack import Stack

MAX_VALUE_BYTES = 1000
MAX_BODY_BYTES = 4096


@pytest_asyncio.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The combined API with small limits, so that "too large" is cheap to send."""
    service = await stack.launch(
        "api", MAX_VALUE_BYTES=str(MAX_VALUE_BYTES), MAX_BODY_BYTES=str(MAX_BODY_BYTES)
    )
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        yield client
    stored = await stack.scalar(stack.write_engine, "SELECT count(*) FROM commands")
    assert stored == 0, "a refused request stored a command"


JSON = {"content-type": "application/json"}

BAD_WRITES = [
    pytest.param(b'{"value": "v"}', 422, "key", id="missing-key"),
    pytest.param(b'{"key": "k"}', 422, "value", id="missing-value"),
    pytest.param(b'{"key": "k", "value": 5}', 422, "value", id="value-not-a-string"),
    pytest.param(b'{"key": 5, "value": "v"}', 422, "key", id="key-not-a-string"),
    pytest.param(b'{"key": "", "value": "v"}', 422, "key", id="empty-key"),
    pytest.param(b'{"key": "' + b"k" * 256 + b'", "value": "v"}', 422, "key", id="key-256"),
    pytest.param(b'{"key": "a\\u0000b", "value": "v"}', 422, "NUL", id="nul-in-key"),
    pytest.param(b'{"key": "k", "value": "a\\u0000"}', 422, "NUL", id="nul-in-value"),
    pytest.param(b'{"key": "k", "value": "\\ud800"}', 422, "surrogate", id="lone-surrogate"),
    pytest.param(b'{"key": "k", "value": ', 400, "JSON", id="malformed-json"),
    pytest.param(b'["k", "v"]', 422, "body", id="array-body"),
    pytest.param(b"", 422, "body", id="empty-body"),
    pytest.param(
        b'{"key": "k", "value": "' + b"x" * (MAX_VALUE_BYTES + 1) + b'"}',
        413,
        str(MAX_VALUE_BYTES),
        id="oversized-value",
    ),
    pytest.param(
        b'{"key": "k", "value": "' + b"x" * MAX_BODY_BYTES + b'"}',
        413,
        str(MAX_BODY_BYTES),
        id="oversized-body",
    ),
]


@pytest.mark.parametrize(("body", "status", "mentions"), BAD_WRITES)
@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_bad_write_is_refused_clearly(
    api: httpx.AsyncClient, method: str, body: bytes, status: int, mentions: str
) -> None:
    answer = await api.request(method, "/write", content=body, headers=JSON)
    assert answer.status_code == status, answer.text
    payload = answer.json()
    assert payload["success"] is False
    assert mentions.lower() in answer.text.lower(), payload


async def test_wrong_content_type(api: httpx.AsyncClient) -> None:
    answer = await api.post(
        "/write",
        content=b"key=k&value=v",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 415
    assert "application/json" in answer.json()["message"]


async def test_chunked_body_over_the_limit(api: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"key": "k", "value": "'
        for _ in range(10):
            yield b"x" * 1024
        yield b'"}'

    answer = await api.post("/write", content=chunks(), headers=JSON)
    assert answer.status_code == 413


async def test_largest_allowed_key_and_value_are_accepted(stack: Stack) -> None:
    service = await stack.launch("api", MAX_VALUE_BYTES=str(MAX_VALUE_BYTES))
    async with httpx.AsyncClient(base_url=service.url) as client:
        answer = await client.post("/write", json={"key": "k" * 255, "value": "é" * 500})
    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/read/" + "k" * 256, 422),
        ("/read/a%00b", 422),
        ("/read/x?position=0", 422),
        ("/read/x?position=abc", 422),
        ("/read/x?position=1&timeout=-1", 422),
    ],
)
async def test_bad_read_is_refused_clearly(api: httpx.AsyncClient, path: str, status: int) -> None:
    answer = await api.get(path)
    assert answer.status_code == status, answer.text
    assert answer.json()["success"] is False


@pytest.mark.parametrize("hot_paths", ["true", "false"])
async def test_write_token_when_configured(stack: Stack, hot_paths: str) -> None:
    service = await stack.launch("write-api", WRITE_API_TOKEN="s3cret-token", HOT_PATHS=hot_paths)
    body = {"key": "guarded", "value": "v"}
    async with httpx.AsyncClient(base_url=service.url) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-token"}):
            refused = await client.post("/write", json=body, headers=headers)
            assert refused.status_code == 401, headers
            assert refused.json()["error"] == "unauthorized"
            assert refused.headers["www-authenticate"].startswith("Bearer")
        # The token is checked before the body is read: no hint about the body without it.
        for content, content_type in ((b"{", "application/json"), (b"k=v", "text/plain")):
            refused = await client.post(
                "/write", content=content, headers={"content-type": content_type}
            )
            assert refused.status_code == 401, refused.text
        assert await stack.scalar(stack.write_engine, "SELECT count(*) FROM commands") == 0
        allowed = await client.put(
            "/write", json=body, headers={"authorization": "Bearer s3cret-token"}
        )
        assert allowed.status_code == 200
    assert "s3cret-token" not in service.log()


@pytest.mark.parametrize("hot_paths", ["true", "false"])
async def test_a_token_that_is_not_ascii(stack: Stack, hot_paths: str) -> None:
    # Clients (curl, httpx, browsers) send a non-ASCII token as its UTF-8 bytes; the token is
    # compared as those bytes, not decoded as Latin-1 and encoded again.
    token = "sécret"
    service = await stack.launch("write-api", WRITE_API_TOKEN=token, HOT_PATHS=hot_paths)
    body = b'{"key": "k", "value": "v"}'
    async with httpx.AsyncClient(base_url=service.url) as client:
        for authorization, status in (
            (b"Bearer " + token.encode(), 200),
            (b"Bearer " + token.encode("latin-1"), 401),
        ):
            headers = [(b"authorization", authorization)]
            answer = await client.post("/write", content=body, headers=headers)
            assert answer.status_code == status, (authorization, answer.text)


async def test_writes_need_no_token_by_default(stack: Stack) -> None:
    service = await stack.launch("write-api")
    async with httpx.AsyncClient(base_url=service.url) as client:
        answer = await client.post("/write", json={"key": "open", "value": "v"})
    assert answer.status_code == 200


@pytest.mark.parametrize("hot_paths", ["true", "false"])
async def test_two_authorization_headers_are_refused(stack: Stack, hot_paths: str) -> None:
    # Which copy counts is ambiguous (one layer keeps the first, another the last): a wrong
    # token followed by the right one, or the reverse, must not pass on any path.
    token = "s3cret-token"
    service = await stack.launch("write-api", WRITE_API_TOKEN=token, HOT_PATHS=hot_paths)
    right, wrong = ("authorization", f"Bearer {token}"), ("authorization", "Bearer wrong")
    body = {"key": "guarded", "value": "v"}
    async with httpx.AsyncClient(base_url=service.url) as client:
        for method in ("POST", "PUT"):
            for headers in ([wrong, right], [right, wrong], [right, right]):
                refused = await client.request(method, "/write", json=body, headers=headers)
                assert refused.status_code == 400, (method, headers, refused.text)
                assert refused.json()["error"] == "duplicate_header"
                assert "authorization" in refused.json()["message"]
        assert await stack.scalar(stack.write_engine, "SELECT count(*) FROM commands") == 0
        allowed = await client.post("/write", json=body, headers=[right])
        assert allowed.status_code == 200, allowed.text
    assert token not in service.log()
