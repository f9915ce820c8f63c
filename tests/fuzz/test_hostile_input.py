"""Hostile input against live processes: never a 5xx, always a clear JSON 4xx, nothing stored.

Complements tests/integration/test_bad_input.py (the contract's bad-input table) with what an
attacker or a broken client sends: huge and deeply nested bodies, odd Unicode, path traversal
in keys, wrong content types, duplicate JSON keys and numbers where strings belong. Accepted
odd-but-valid keys and values must round-trip exactly through the read model.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest_asyncio

from tests.fixtures.stack import Stack

MAX_VALUE_BYTES = 1000
MAX_BODY_BYTES = 4096
JSON = {"content-type": "application/json"}


@dataclass
class Api:
    """The combined API (writes and reads on one port) and a projector, with small limits."""

    client: httpx.AsyncClient
    stack: Stack

    async def stored(self) -> int:
        """Commands in the write DB."""
        return int(
            await self.stack.scalar(self.stack.write_engine, "SELECT count(*) FROM commands")
        )


@pytest_asyncio.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    service = await stack.launch(
        "api", MAX_VALUE_BYTES=str(MAX_VALUE_BYTES), MAX_BODY_BYTES=str(MAX_BODY_BYTES)
    )
    await stack.launch("projector")
    async with httpx.AsyncClient(base_url=service.url, timeout=20) as client:
        yield Api(client, stack)


def refused(answer: httpx.Response, *statuses: int) -> str | None:
    """Why ``answer`` is not a clear JSON refusal with one of ``statuses`` (None when it is)."""
    if answer.status_code not in statuses:
        return f"status {answer.status_code} not in {statuses}: {answer.text[:300]}"
    try:
        body = answer.json()
    except ValueError:
        return f"not JSON: {answer.text[:300]}"
    if body.get("success") is not False or not body.get("error") or not body.get("message"):
        return f"not an ErrorResponse: {body}"
    return None


def check_all(problems: dict[str, str | None]) -> None:
    """Fail once, listing every case that went wrong."""
    failed = {case: why for case, why in problems.items() if why}
    assert not failed, "\n".join(f"{case}: {why}" for case, why in failed.items())


def key_path(key: str) -> str:
    """/read/ path of ``key``; dots too are escaped, else a client drops "." and ".." segments."""
    return "/read/" + quote(key, safe="").replace(".", "%2E")


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


async def test_huge_bodies_are_refused_early(api: Api) -> None:
    big = b'{"key": "k", "value": "' + b"x" * (8 * 1024 * 1024) + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"y" * 65536

    problems = {
        "8MiB POST": refused(await api.client.post("/write", content=big, headers=JSON), 413),
        "8MiB PUT": refused(await api.client.put("/write", content=big, headers=JSON), 413),
        "4MiB chunked": refused(
            await api.client.post("/write", content=chunks(), headers=JSON), 413
        ),
        "8MiB body on a GET": refused(
            await api.client.request("GET", "/read/k", content=big, headers=JSON), 413
        ),
        "value one byte over": refused(
            await api.client.post(
                "/write", json={"key": "k", "value": "é" * (MAX_VALUE_BYTES // 2) + "x"}
            ),
            413,
        ),
    }
    check_all(problems)
    assert await api.stored() == 0


async def test_deeply_nested_json_is_refused(api: Api) -> None:
    problems: dict[str, str | None] = {}
    for depth in (1000, 2000):  # 2000 levels is 4000 bytes: still under the body limit
        deep = nested(depth)
        bodies = {
            f"whole body {depth}": deep,
            f"value {depth}": b'{"key": "k", "value": ' + deep + b"}",
            f"key {depth}": b'{"key": ' + deep + b', "value": "v"}',
            f"extra field {depth}": b'{"key": "k", "value": "v", "x": ' + deep[:4000] + b"}",
        }
        for case, body in bodies.items():
            answer = await api.client.post("/write", content=body, headers=JSON)
            problems[case] = refused(answer, 400) or (
                None if "nested too deeply" in answer.text else answer.text[:200]
            )
    shallow = nested(50)
    answer = await api.client.post("/write", content=b'{"key": "k", "value": ' + shallow + b"}")
    problems["value 50"] = refused(answer, 422)
    check_all(problems)
    assert await api.stored() == 0


ODD_TEXT = {
    "rtl override": "\u202eevil\u202c.txt",
    "hebrew and arabic": "שלום مرحبا",
    "combining marks": "e\u0301\u0301\u0301a\u0308\u20dd",
    "zalgo": "Z" + "\u0336\u0337\u0338" * 30,
    "emoji and zwj": "👩‍👩‍👧‍👦🏳️‍🌈",
    "astral plane": "\U0010fffd\U0001d11e",
    "non-characters": "\ufffe\uffff\ufdd0",
    "bom": "\ufeffkey",
    "line separators": "a\u2028b\u2029c\u0085d",
    "controls": "\x01\x02\x1b[31mred\x7f",
    "crlf injection": "k\r\nSet-Cookie: x=1",
    "sql metacharacters": "k'; DROP TABLE commands; --",
    "redis-looking": "*1\r\n$8\r\nFLUSHALL\r\n",
    "whitespace only": "   ",
}


async def test_odd_unicode_round_trips_exactly(api: Api) -> None:
    problems: dict[str, str | None] = {}
    for case, text in ODD_TEXT.items():
        key = f"odd:{case}:{text}"[:255]
        answer = await api.client.post("/write", json={"key": key, "value": text})
        if answer.status_code != 200:
            problems[case] = f"write refused: {answer.status_code} {answer.text[:200]}"
            continue
        position = answer.json()["position"]
        read = await api.client.get(key_path(key), params={"position": position, "timeout": 10})
        body = read.json()
        if read.status_code != 200 or (body.get("key"), body.get("value")) != (key, text):
            problems[case] = f"read back {read.status_code}: {body}"
    check_all(problems)
    assert await api.stored() == len(ODD_TEXT)
    await api.stack.assert_converges()


async def test_invalid_unicode_is_refused(api: Api) -> None:
    bodies = {
        "lone high surrogate in key": (b'{"key": "\\ud800", "value": "v"}', 422),
        "lone low surrogate in value": (b'{"key": "k", "value": "a\\udc80b"}', 422),
        "reversed surrogate pair": (b'{"key": "k", "value": "\\udc00\\ud800"}', 422),
        "NUL in key": (b'{"key": "\\u0000", "value": "v"}', 422),
        "raw invalid UTF-8": (b'{"key": "k", "value": "\xff\xfe"}', 400),
        "raw encoded surrogate": (b'{"key": "k", "value": "\xed\xa0\x80"}', 400),  # CESU-8
        "overlong UTF-8 slash": (b'{"key": "\xc0\xaf", "value": "v"}', 400),
    }
    problems = {}
    for case, (body, status) in bodies.items():
        answer = await api.client.post("/write", content=body, headers=JSON)
        problems[case] = refused(answer, status)
    for case, path in {
        "NUL in path": "/read/a%00b",
        "NUL alone": "/read/%00",
    }.items():
        problems[case] = refused(await api.client.get(path), 422)
    odd_paths = {"invalid UTF-8 in path": "/read/%ff%fe", "encoded surrogate": "/read/%ed%a0%80"}
    for case, path in odd_paths.items():
        answer = await api.client.get(path)
        problems[case] = None if answer.status_code in (200, 400, 422) else answer.text[:300]
    check_all(problems)
    assert await api.stored() == 0


TRAVERSAL_KEYS = [
    "../../etc/passwd",
    "..",
    ".",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2f",
    "..\\..\\windows\\win.ini",
    "a/b/c",
    "/leading",
    "trailing/",
    "a//b",
    "a?b=c#d",
    "%00",
    "~root/.ssh/id_rsa",
    "file:///etc/passwd",
]


async def test_path_traversal_keys_are_just_keys(api: Api) -> None:
    problems: dict[str, str | None] = {}
    for key in TRAVERSAL_KEYS:
        answer = await api.client.post("/write", json={"key": key, "value": f"v:{key}"})
        if answer.status_code != 200:
            problems[key] = f"write: {answer.status_code} {answer.text[:200]}"
            continue
        read = await api.client.get(
            key_path(key),
            params={"position": answer.json()["position"], "timeout": 10},
        )
        body = read.json()
        if (body.get("key"), body.get("value")) != (key, f"v:{key}"):
            problems[key] = f"read back: {body}"
    # Raw, unencoded traversal in the URL: a key or a 404, never a file and never a 5xx.
    for raw in ("/read/../../etc/passwd", "/read/..%2f..%2fetc%2fpasswd", "/read/%2e%2e/%2e%2e"):
        url = api.client.base_url.copy_with(raw_path=raw.encode())
        answer = await api.client.send(api.client.build_request("GET", url))
        if answer.status_code >= 500 or "root:" in answer.text:
            problems[raw] = f"{answer.status_code} {answer.text[:200]}"
    check_all(problems)
    assert await api.stored() == len(TRAVERSAL_KEYS)
    await api.stack.assert_converges()


async def test_wrong_content_types_are_refused(api: Api) -> None:
    body = json.dumps({"key": "k", "value": "v"}).encode()
    problems: dict[str, str | None] = {}
    for content_type in (
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "text/json",
        "application/octet-stream",
        "*/*",
    ):
        answer = await api.client.post(
            "/write", content=body, headers={"content-type": content_type}
        )
        problems[repr(content_type)] = refused(answer, 415)
    assert await api.stored() == 0
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        answer = await api.client.post(
            "/write", content=body, headers={"content-type": content_type}
        )
        problems[repr(content_type)] = None if answer.status_code == 200 else answer.text[:300]
    check_all(problems)


async def test_duplicate_json_keys_are_refused(api: Api) -> None:
    problems = {}
    for case, body in {
        "key twice": b'{"key": "a", "key": "b", "value": "v"}',
        "value twice": b'{"key": "k", "value": "x", "value": "y"}',
        "extra twice": b'{"key": "k", "value": "v", "x": 1, "x": 2}',
    }.items():
        answer = await api.client.post("/write", content=body, headers=JSON)
        problems[case] = refused(answer, 400)
        if not problems[case] and "duplicate" not in answer.json()["message"]:
            problems[case] = f"message does not say duplicate: {answer.text}"
    check_all(problems)
    assert await api.stored() == 0


async def test_numbers_and_other_types_where_strings_belong(api: Api) -> None:
    bodies = {
        "key int": b'{"key": 1, "value": "v"}',
        "value float": b'{"key": "k", "value": 1.5}',
        "value bool": b'{"key": "k", "value": true}',
        "value null": b'{"key": "k", "value": null}',
        "value NaN": b'{"key": "k", "value": NaN}',
        "value Infinity": b'{"key": "k", "value": -Infinity}',
        "value huge int": b'{"key": "k", "value": 1' + b"0" * 4000 + b"}",
        "value list": b'{"key": "k", "value": ["v"]}',
        "value object": b'{"key": "k", "value": {"v": 1}}',
        "body null": b"null",
        "body string": b'"key"',
        "body number": b"42",
    }
    problems = {}
    for case, body in bodies.items():
        problems[case] = refused(
            await api.client.post("/write", content=body, headers=JSON), 400, 422
        )
    for query in (
        "position=1.5",
        "position=1e3",
        "position=0x10",
        "position=9223372036854775808",
        "position=-1",
        "position=%D9%A3",  # ARABIC-INDIC DIGIT THREE
        "position=1&timeout=nan",
        "position=1&timeout=inf",
        "position=1&timeout=61",
        "position=1&timeout=1e308",
        "timeout=abc",
    ):
        problems[query] = refused(await api.client.get(f"/read/k?{query}"), 422)
    check_all(problems)
    assert await api.stored() == 0
    answer = await api.client.post("/write", json={"key": "1", "value": "2"})
    assert answer.status_code == 200, answer.text


async def test_oversized_headers_and_urls_are_not_5xx(api: Api) -> None:
    problems: dict[str, str | None] = {}
    answer = await api.client.get("/read/" + "k" * 60000)
    problems["60k path"] = None if 400 <= answer.status_code < 500 else str(answer.status_code)
    try:
        answer = await api.client.get("/read/k", headers={"x-big": "h" * 100_000})
        problems["100k header"] = None if answer.status_code < 500 else answer.text[:200]
    except httpx.RemoteProtocolError:
        problems["100k header"] = None  # the server closed the connection: refused too
    check_all(problems)
    assert (await api.client.get("/health")).status_code == 200
