"""Safe writes against real servers: Idempotency-Key (retries answer the original answer),
If-Match / If-None-Match (expected versions, checked atomically in the write DB) and the
read's ETag, on the hot path and on the framework path."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from cqrs_stack.localservers import RedisServer
from tests.fixtures.stack import ServiceProcess, Stack, wait_until

PATHS = pytest.mark.parametrize("hot_paths", ["true", "false"])
REPLAYED = "idempotency-replayed"


async def commands_of(stack: Stack, key: str) -> int:
    return int(
        await stack.scalar(
            stack.write_engine, "SELECT count(*) FROM commands WHERE key = :k", k=key
        )
    )


async def idempotency_rows(stack: Stack) -> int:
    return int(await stack.scalar(stack.write_engine, "SELECT count(*) FROM idempotency_keys"))


def keyed(key: str, **more: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **more}


async def send_and_hang_up(
    api: ServiceProcess, method: str, body: dict[str, Any], key: str
) -> None:
    """Send a whole write, then close the connection before reading any answer."""
    payload = json.dumps(body).encode()
    head = (
        f"{method} /write HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nIdempotency-Key: {key}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", api.port)
    writer.write(head + payload)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


@PATHS
async def test_a_retry_after_a_dropped_connection_finds_the_original(
    stack: Stack, hot_paths: str
) -> None:
    api = await stack.launch("write-api", HOT_PATHS=hot_paths)
    body = {"key": "dropped", "value": "v1"}
    await send_and_hang_up(api, "POST", body, "retry-1")

    async def stored() -> bool:
        return await commands_of(stack, "dropped") == 1

    await wait_until(stored, 10, "the write sent before the hang-up to be stored")
    position = await stack.scalar(stack.write_engine, "SELECT id FROM commands")
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        retry = await client.post("/write", json=body, headers=keyed("retry-1"))
    assert retry.status_code == 200, retry.text
    assert retry.headers[REPLAYED] == "true"
    assert retry.json()["position"] == position
    assert retry.headers["etag"] == '"1"'
    assert await commands_of(stack, "dropped") == 1


@PATHS
async def test_64_concurrent_writes_with_one_key_store_one_command(
    stack: Stack, hot_paths: str
) -> None:
    api = await stack.launch("write-api", HOT_PATHS=hot_paths)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=api.url, timeout=30, limits=limits) as client:
        answers = await asyncio.gather(
            *(
                client.post("/write", json={"key": "k64", "value": "v"}, headers=keyed("one"))
                for _ in range(64)
            )
        )
    assert [a.status_code for a in answers] == [200] * 64
    assert len({a.content for a in answers}) == 1, {a.content for a in answers}
    assert sum(REPLAYED not in a.headers for a in answers) == 1  # the one that wrote
    assert {a.headers["etag"] for a in answers} == {'"1"'}
    assert await commands_of(stack, "k64") == 1


async def test_concurrent_writes_of_one_key_with_two_bodies_store_one(stack: Stack) -> None:
    api = await stack.launch("write-api")
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=api.url, timeout=30, limits=limits) as client:
        answers = await asyncio.gather(
            *(
                client.post("/write", json={"key": "two", "value": f"v{i % 2}"}, headers=keyed("k"))
                for i in range(64)
            )
        )
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(ok) == 32 and len(refused) == 32, [a.status_code for a in answers]
    assert len({a.content for a in ok}) == 1
    assert {a.json()["error"] for a in refused} == {"idempotency_key_reused"}
    assert await commands_of(stack, "two") == 1


@PATHS
async def test_a_key_reused_with_another_body_or_method_is_refused(
    stack: Stack, hot_paths: str
) -> None:
    api = await stack.launch("write-api", HOT_PATHS=hot_paths)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        first = await client.post("/write", json={"key": "r", "value": "a"}, headers=keyed("re"))
        assert first.status_code == 200 and REPLAYED not in first.headers
        for method, value in (("POST", "b"), ("PUT", "a")):
            answer = await client.request(
                method, "/write", json={"key": "r", "value": value}, headers=keyed("re")
            )
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"] == "idempotency_key_reused"
        again = await client.post("/write", json={"key": "r", "value": "a"}, headers=keyed("re"))
        assert again.status_code == 200 and again.headers[REPLAYED] == "true"
        assert again.content == first.content
    assert await commands_of(stack, "r") == 1


@PATHS
async def test_an_idempotency_key_is_at_most_255_visible_ascii_characters(
    stack: Stack, hot_paths: str
) -> None:
    api = await stack.launch("write-api", HOT_PATHS=hot_paths)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        at_limit = await client.post(
            "/write", json={"key": "l", "value": "v"}, headers=keyed("k" * 255)
        )
        assert at_limit.status_code == 200, at_limit.text
        for bad in ("k" * 256, "", "with space", "caf\u00e9", "tab\there"):
            answer = await client.post(
                "/write",
                json={"key": "l", "value": "v"},
                headers=[("Idempotency-Key", bad.encode())],
            )
            assert answer.status_code == 400, (bad, answer.text)
            assert answer.json()["error"] == "invalid_idempotency_key"
        twice = await client.post(
            "/write",
            json={"key": "l", "value": "v"},
            headers=[("Idempotency-Key", b"a"), ("Idempotency-Key", b"b")],
        )
        assert twice.status_code == 400 and twice.json()["error"] == "duplicate_header"
    assert await commands_of(stack, "l") == 1
    assert await idempotency_rows(stack) == 1


@PATHS
async def test_expected_versions_and_the_read_etag(stack: Stack, hot_paths: str) -> None:
    write_api = await stack.launch("write-api", HOT_PATHS=hot_paths)
    read_api = await stack.launch("read-api", HOT_PATHS=hot_paths)
    await stack.launch("projector")
    body = {"key": "ver", "value": "a"}
    async with httpx.AsyncClient(base_url=write_api.url, timeout=10) as client:
        created = await client.post("/write", json=body, headers={"If-None-Match": "*"})
        assert created.status_code == 200 and created.headers["etag"] == '"1"'
        again = await client.post("/write", json=body, headers={"If-None-Match": "*"})
        assert again.status_code == 412, again.text
        assert again.json()["error"] == "precondition_failed"
        assert again.json()["current_version"] == 1 and again.headers["etag"] == '"1"'
        updated = await client.put("/write", json=body, headers={"If-Match": '"1"'})
        assert updated.status_code == 200 and updated.headers["etag"] == '"2"'
        stale = await client.put("/write", json=body, headers={"If-Match": '"1"'})
        assert stale.status_code == 412 and stale.json()["current_version"] == 2
        missing = await client.put(
            "/write", json={"key": "none", "value": "v"}, headers={"If-Match": "*"}
        )
        assert missing.status_code == 412 and missing.json()["current_version"] == 0
        for headers in (
            {"If-Match": "2"},
            {"If-Match": 'W/"2"'},
            {"If-Match": '"02"'},
            {"If-Match": '"1", "2"'},
            {"If-Match": '"99999999999999999999"'},
            {"If-None-Match": '"2"'},
            {"If-Match": '"2"', "If-None-Match": "*"},
        ):
            bad = await client.put("/write", json=body, headers=headers)
            assert bad.status_code == 400, (headers, bad.text)
            assert bad.json()["error"] == "invalid_precondition"
        # A retry of a conditional write that succeeded replays it, not 412.
        third = await client.put("/write", json=body, headers={"If-Match": '"2"', **keyed("c3")})
        retry = await client.put("/write", json=body, headers={"If-Match": '"2"', **keyed("c3")})
        assert third.status_code == retry.status_code == 200
        assert retry.content == third.content and retry.headers[REPLAYED] == "true"
        assert retry.headers["etag"] == third.headers["etag"] == '"3"'
    assert await commands_of(stack, "ver") == 3
    await stack.assert_converges()
    async with httpx.AsyncClient(base_url=read_api.url, timeout=10) as client:
        read = await client.get("/read/ver")
        assert read.headers["etag"] == '"3"' and read.json()["write_count"] == 3
        waited = await client.get("/read/ver", params={"position": third.json()["position"]})
        assert waited.headers["etag"] == '"3"'
        assert "etag" not in (await client.get("/read/none")).headers


async def race(urls: list[str], rounds: int, request: Callable[[int], dict[str, Any]]) -> None:
    """``rounds`` times, one write per URL at once: exactly one must win each time."""
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(rounds):
            answers = await asyncio.gather(
                *(client.request(url=f"{url}/write", **request(n)) for url in urls)
            )
            statuses = sorted(a.status_code for a in answers)
            assert statuses == [200] + [412] * (len(urls) - 1), [a.text for a in answers]
            lost = next(a for a in answers if a.status_code == 412)
            assert lost.json()["error"] == "precondition_failed"


async def test_two_writers_with_one_if_match_exactly_one_wins(stack: Stack) -> None:
    # Two processes (hot path and framework path): the check is the write DB's, not memory's.
    first = await stack.launch("write-api", HOT_PATHS="true")
    second = await stack.launch("write-api", HOT_PATHS="false")
    async with httpx.AsyncClient(timeout=10) as client:
        seed = await client.post(
            f"{first.url}/write", json={"key": "race", "value": "0"}, headers={"If-None-Match": "*"}
        )
        assert seed.headers["etag"] == '"1"'

    def conditional(n: int) -> dict[str, Any]:
        return {
            "method": "PUT",
            "json": {"key": "race", "value": str(n)},
            "headers": {"If-Match": f'"{n + 1}"'},
        }

    rounds = 20
    await race([first.url, second.url], rounds, conditional)
    assert await commands_of(stack, "race") == rounds + 1
    version = await stack.scalar(
        stack.write_engine, "SELECT version FROM key_versions WHERE key = 'race'"
    )
    assert version == rounds + 1


async def test_two_creators_with_if_none_match_exactly_one_wins(stack: Stack) -> None:
    first = await stack.launch("write-api", HOT_PATHS="true")
    second = await stack.launch("write-api", HOT_PATHS="false")

    def create(n: int) -> dict[str, Any]:
        return {
            "method": "POST",
            "json": {"key": f"new{n}", "value": "v"},
            "headers": {"If-None-Match": "*"},
        }

    rounds = 20
    await race([first.url, second.url], rounds, create)
    counts = await stack.scalar(
        stack.write_engine,
        "SELECT count(DISTINCT key) = count(*) AND count(*) = :n FROM commands",
        n=rounds,
    )
    assert counts is True


async def test_a_retry_after_the_write_api_restarted_finds_the_original(stack: Stack) -> None:
    api = await stack.launch("write-api")
    body = {"key": "restart", "value": "v"}
    async with httpx.AsyncClient(timeout=10) as client:
        original = await client.post(f"{api.url}/write", json=body, headers=keyed("rs"))
        assert original.status_code == 200
        api.kill()
        replacement = await stack.launch("write-api", HOT_PATHS="false")
        retry = await client.post(f"{replacement.url}/write", json=body, headers=keyed("rs"))
    assert retry.status_code == 200 and retry.headers[REPLAYED] == "true"
    assert retry.content == original.content
    assert retry.json()["event_id"] is not None  # the original was published: same stream id
    assert await commands_of(stack, "restart") == 1


async def test_expired_keys_are_removed_and_then_the_key_writes_anew(stack: Stack) -> None:
    api = await stack.launch(
        "write-api",
        IDEMPOTENCY_RETENTION="1",
        IDEMPOTENCY_EXPIRY_INTERVAL="0.2",
        IDEMPOTENCY_EXPIRY_BATCH="2",  # 5 keys: three batches, past one
    )
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        firsts = [
            await client.post("/write", json={"key": "exp", "value": "v"}, headers=keyed(f"e{i}"))
            for i in range(5)
        ]
        assert await idempotency_rows(stack) == 5

        async def expired() -> bool:
            return await idempotency_rows(stack) == 0

        await wait_until(expired, 15, "the expired idempotency keys to be removed")
        anew = await client.post("/write", json={"key": "exp", "value": "v"}, headers=keyed("e0"))
    assert anew.status_code == 200 and REPLAYED not in anew.headers
    assert anew.json()["position"] > firsts[-1].json()["position"]
    assert await commands_of(stack, "exp") == 6


@PATHS
async def test_a_queued_answer_is_replayed_as_queued(
    stack: Stack, redis_factory: Callable[[], RedisServer], hot_paths: str
) -> None:
    redis = redis_factory()
    stack.use_redis(redis)
    api = await stack.launch("write-api", HOT_PATHS=hot_paths)
    redis.stop()
    body = {"key": "queued", "value": "v"}
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        original = await client.post("/write", json=body, headers=keyed("q"))
        assert original.status_code == 200, original.text
        assert original.json()["queued"] is True and original.json()["event_id"] is None
        retry = await client.post("/write", json=body, headers=keyed("q"))
        assert retry.content == original.content and retry.headers[REPLAYED] == "true"
        redis.start()

        async def published() -> bool:
            return not await stack.scalar(
                stack.write_engine, "SELECT count(*) FROM commands WHERE NOT published"
            )

        await wait_until(published, 20, "the queued event to be published")
        later = await client.post("/write", json=body, headers=keyed("q"))
    assert later.content == original.content  # the original answer, as it was given
    assert await commands_of(stack, "queued") == 1


async def test_plain_writes_count_in_the_version(stack: Stack) -> None:
    api = await stack.launch("write-api")
    body = {"key": "plain", "value": "v"}
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        plain = await asyncio.gather(*(client.put("/write", json=body) for _ in range(5)))
        assert [a.status_code for a in plain] == [200] * 5
        assert "etag" not in plain[0].headers  # no version look-up without the headers
        stale = await client.put("/write", json=body, headers={"If-Match": '"4"'})
        assert stale.status_code == 412 and stale.json()["current_version"] == 5
        fresh = await client.put("/write", json=body, headers={"If-Match": '"5"'})
        assert fresh.status_code == 200 and fresh.headers["etag"] == '"6"'
    positions = await stack.scalar(
        stack.write_engine, "SELECT max(id) = :p FROM commands", p=fresh.json()["position"]
    )
    assert positions is True


async def test_one_key_sent_to_two_processes_at_once_stores_one_command(stack: Stack) -> None:
    # Across processes the claim decides: the second waits for the first's transaction.
    first = await stack.launch("write-api", HOT_PATHS="true")
    second = await stack.launch("write-api", HOT_PATHS="false")
    rounds = 20
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(rounds):
            body = {"key": f"twice{n}", "value": "v"}
            answers = await asyncio.gather(
                *(
                    client.post(f"{api.url}/write", json=body, headers=keyed(f"r{n}"))
                    for api in (first, second)
                )
            )
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            assert answers[0].content == answers[1].content
            assert sorted(a.headers.get(REPLAYED, "") for a in answers) == ["", "true"]
    assert await stack.scalar(stack.write_engine, "SELECT count(*) FROM commands") == rounds


async def queue_depth(api: ServiceProcess) -> float:
    async with httpx.AsyncClient(base_url=api.url, timeout=5) as client:
        text = (await client.get("/metrics")).text
    line = next(x for x in text.splitlines() if x.startswith("cqrs_write_queue_depth "))
    return float(line.split()[1])


async def waiting_on_a_lock(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()"
        )
    )


async def one_batch(
    stack: Stack, api: ServiceProcess, client: httpx.AsyncClient, sends: list[Any]
) -> list[httpx.Response]:
    """Send the writes of ``sends`` (callables returning the request's coroutine) so that
    they form one batch, in that order: a first write's batch is held on a table lock while
    the others queue, one by one, then the lock is released."""
    conn = await asyncpg.connect(stack.env["WRITE_DB_URL"])
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE commands IN SHARE MODE")  # blocks INSERTs only
        filler = asyncio.create_task(client.post("/write", json={"key": "filler", "value": "f"}))

        async def filler_waits() -> bool:
            return await waiting_on_a_lock(conn)

        await wait_until(filler_waits, 10, "the first batch to wait on the table lock")
        tasks = []
        for n, send in enumerate(sends, start=2):
            tasks.append(asyncio.create_task(send()))

            async def queued(n: int = n) -> bool:
                return await queue_depth(api) >= n

            await wait_until(queued, 10, f"{n} writes in hand")
        await tx.rollback()
        assert (await filler).status_code == 200
        return list(await asyncio.gather(*tasks))
    finally:
        await conn.close()


@PATHS
async def test_a_refused_write_repeated_in_its_batch_is_settled_anew(
    stack: Stack, hot_paths: str
) -> None:
    # One batch: a write refused 412, then the same key and body without the precondition.
    api = await stack.launch("write-api", HOT_PATHS=hot_paths)
    body = {"key": "ib", "value": "v"}
    async with httpx.AsyncClient(base_url=api.url, timeout=20) as client:
        assert (await client.post("/write", json={"key": "ib", "value": "0"})).status_code == 200
        refused, stored = await one_batch(
            stack,
            api,
            client,
            [
                lambda: client.post(
                    "/write", json=body, headers=keyed("ib1", **{"If-None-Match": "*"})
                ),
                lambda: client.post("/write", json=body, headers=keyed("ib1")),
            ],
        )
        assert refused.status_code == 412, refused.text
        assert stored.status_code == 200, stored.text
        assert REPLAYED not in stored.headers and stored.headers["etag"] == '"2"'
        retry = await client.post("/write", json=body, headers=keyed("ib1"))
        assert retry.headers[REPLAYED] == "true" and retry.content == stored.content
    assert await commands_of(stack, "ib") == 2


async def test_a_plain_write_batched_with_keyed_writes_has_no_etag(stack: Stack) -> None:
    api = await stack.launch("write-api")
    async with httpx.AsyncClient(base_url=api.url, timeout=20) as client:
        keyed_write, plain = await one_batch(
            stack,
            api,
            client,
            [
                lambda: client.post(
                    "/write", json={"key": "mx1", "value": "v"}, headers=keyed("mx")
                ),
                lambda: client.post("/write", json={"key": "mx2", "value": "v"}),
            ],
        )
    assert keyed_write.status_code == 200 and keyed_write.headers["etag"] == '"1"'
    assert plain.status_code == 200 and "etag" not in plain.headers


@PATHS
async def test_the_precondition_is_part_of_the_idempotency_digest(
    stack: Stack, hot_paths: str
) -> None:
    api = await stack.launch("write-api", HOT_PATHS=hot_paths)
    body = {"key": "pd", "value": "v"}
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        first = await client.post(
            "/write", json=body, headers=keyed("pd", **{"If-None-Match": "*"})
        )
        assert first.status_code == 200 and first.headers["etag"] == '"1"'
        # The same request again: its answer, although the key is no longer at version 0.
        again = await client.post(
            "/write", json=body, headers=keyed("pd", **{"If-None-Match": "*"})
        )
        assert again.headers[REPLAYED] == "true" and again.content == first.content
        for other in ({}, {"If-Match": '"0"'}, {"If-Match": "*"}):
            reused = await client.post("/write", json=body, headers=keyed("pd", **other))
            assert reused.status_code == 422, (other, reused.text)
            assert reused.json()["error"] == "idempotency_key_reused"
    assert await commands_of(stack, "pd") == 1


async def test_a_refused_write_stores_nothing(stack: Stack) -> None:
    api = await stack.launch("write-api")
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        for n, headers in enumerate(({"If-Match": '"3"'}, {"If-Match": "*"})):
            refused = await client.put(
                "/write", json={"key": f"no{n}", "value": "v"}, headers=keyed(f"no{n}", **headers)
            )
            assert refused.status_code == 412 and refused.headers["etag"] == '"0"'
    assert await stack.scalar(stack.write_engine, "SELECT count(*) FROM key_versions") == 0
    assert await idempotency_rows(stack) == 0
    assert await stack.scalar(stack.write_engine, "SELECT count(*) FROM commands") == 0


async def test_each_key_expires_by_the_retention_of_the_process_that_stored_it(
    stack: Stack,
) -> None:
    fast = dict(IDEMPOTENCY_EXPIRY_INTERVAL="0.2")
    short = await stack.launch("write-api", IDEMPOTENCY_RETENTION="1", **fast)
    long = await stack.launch("write-api", IDEMPOTENCY_RETENTION="3600", **fast)
    async with httpx.AsyncClient(timeout=10) as client:
        for api, key in ((long, "kept"), (short, "gone")):
            answer = await client.post(
                f"{api.url}/write", json={"key": key, "value": "v"}, headers=keyed(key)
            )
            assert answer.status_code == 200

    async def short_one_expired() -> bool:
        return await idempotency_rows(stack) == 1

    await wait_until(short_one_expired, 10, "the key stored with a 1 s retention to expire")
    await asyncio.sleep(0.5)  # more rounds of both expiry tasks (0.2 s each)
    left = await stack.scalar(
        stack.write_engine,
        "SELECT key || ':' || (expires_at > clock_timestamp() + interval '3500 s')"
        " FROM idempotency_keys",
    )
    assert left == "kept:true"


async def test_a_frozen_write_api_holding_a_key_stalls_no_other_writer(stack: Stack) -> None:
    # A second write API frozen (SIGSTOP) inside a keyed write's transaction, holding the
    # key, its Idempotency-Key and their rows; the server ends it after its idle bound.
    frozen = await stack.launch("write-api", WRITE_IDLE_TRANSACTION_TIMEOUT="3")
    api = await stack.launch("write-api", WRITE_KEY_BUSY_TIMEOUT="1")
    conn = await asyncpg.connect(stack.env["WRITE_DB_URL"])
    body = {"key": "held", "value": "v"}
    try:
        async with httpx.AsyncClient(timeout=20) as client:
            assert (await client.post(f"{api.url}/write", json=body)).status_code == 200
            tx = conn.transaction()
            await tx.start()
            # Hold the key's version row so that the keyed write waits in its INSERT, then
            # freeze its process and let the INSERT finish: its transaction stays open.
            await conn.execute("SELECT 1 FROM key_versions WHERE key = 'held' FOR UPDATE")
            stuck = asyncio.create_task(
                client.post(f"{frozen.url}/write", json=body, headers=keyed("held"))
            )

            async def frozen_waits() -> bool:
                return await waiting_on_a_lock(conn)

            await wait_until(frozen_waits, 10, "the keyed write to wait on the row lock")
            frozen.process.send_signal(signal.SIGSTOP)
            await tx.rollback()  # its INSERT completes; its transaction stays open, frozen

            async def idle_in_transaction() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE state = 'idle in transaction' AND datname = current_database()"
                    )
                )

            await wait_until(idle_in_transaction, 10, "the frozen transaction to be idle")

            async def timed(coro: Any) -> tuple[httpx.Response, float]:
                start = time.monotonic()
                answer = await coro
                return answer, time.monotonic() - start

            same_key, *others = await asyncio.gather(
                timed(client.post(f"{api.url}/write", json=body, headers=keyed("held"))),
                *(
                    timed(client.post(f"{api.url}/write", json={"key": f"o{i}", "value": "v"}, **h))
                    for i, h in enumerate(
                        [{}] * 8 + [{"headers": keyed(f"ok{i}")} for i in range(8)]
                    )
                ),
                timed(client.put(f"{api.url}/write", json=body)),  # a plain write of that key
            )
            plain_same = others.pop()
            for answer, took in others:
                assert answer.status_code == 200 and took < 1.0, (answer.text, took)
            for answer, took in (same_key, plain_same):
                assert answer.status_code == 503 and answer.json()["error"] == "key_busy"
                assert answer.headers["retry-after"] == "10" and 1.0 <= took < 2.5, took
            # The write DB ends the frozen session (3 s idle): the key writes anew.
            await wait_until(
                lambda: _not(idle_in_transaction), 10, "the frozen session to be ended"
            )
            anew = await client.post(f"{api.url}/write", json=body, headers=keyed("held"))
            assert anew.status_code == 200 and REPLAYED not in anew.headers, anew.text
            assert anew.headers["etag"] == '"2"'
            frozen.process.send_signal(signal.SIGCONT)
            assert (await stuck).status_code == 503  # its transaction was rolled back
    finally:
        frozen.process.send_signal(signal.SIGCONT)
        await conn.close()
    assert await commands_of(stack, "held") == 2


async def _not(condition: Callable[[], Any]) -> bool:
    return not await condition()
