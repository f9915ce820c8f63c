"""The write path at its edges: a hung Redis, a full queue, a commit whose answer was lost,
/stats right after an answer, and a backlog of large values, all against real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import pytest_asyncio
from sqlalchemy import text

from cqrs_stack.db import create_engine
from cqrs_stack.localservers import PostgresServer, RedisServer, free_port
from cqrs_stack.migrations import migrate
from tests.fixtures.pgproxy import PgProxy
from tests.fixtures.stack import Stack, wait_until


async def unpublished(stack: Stack) -> int:
    """Commands whose event the write DB still holds as queued."""
    return int(
        await stack.scalar(stack.write_engine, "SELECT count(*) FROM commands WHERE NOT published")
    )


async def queue_depth(client: httpx.AsyncClient) -> float:
    """The write API's cqrs_write_queue_depth gauge."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("cqrs_write_queue_depth "):
            return float(line.split()[1])
    return -1.0


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def write_concurrently(url: str, count: int, prefix: str) -> tuple[float, list[dict]]:
    """``count`` concurrent writes, one connection each; return the time taken and the answers."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(
                client.post("/write", json={"key": f"{prefix}{i}", "value": "v"})
                for i in range(count)
            )
        )
        elapsed = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * count
    return elapsed, [a.json() for a in answers]


async def test_a_hung_redis_does_not_throttle_writes(
    stack: Stack, redis_factory: Callable[[], RedisServer]
) -> None:
    redis = redis_factory()
    stack.use_redis(redis)
    # Small batches, so that many run one after another: a wait on Redis per batch would add
    # up to a minute (38 batches of 16), while commits alone take what they take with Redis up.
    api = await stack.launch("write-api", WRITE_BATCH_MAX="16")
    await stack.launch("projector")
    normal, answers = await write_concurrently(api.url, 600, "up")
    assert not any(a["queued"] for a in answers)
    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        hung, answers = await write_concurrently(api.url, 600, "hung")
        assert all(a["queued"] for a in answers)
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            started = time.monotonic()
            stats = (await client.get("/stats")).json()
            waited = time.monotonic() - started
        # /stats waits REDIS_TIMEOUT (1 s) for Redis, not a socket timeout (2 s and more).
        assert stats["redis_available"] is False
        assert waited < 2.0, f"/stats took {waited:.1f}s"
    finally:
        os.kill(redis.process.pid, signal.SIGCONT)
    # One wait of REDIS_TIMEOUT (1 s) for the first batch, then the speed of Redis up (the
    # machine is shared: twice that, plus a second, is "close to normal").
    assert hung < 2 * normal + 2, f"600 writes: {normal:.1f}s with Redis up, {hung:.1f}s hung"

    async def all_published() -> bool:
        return await unpublished(stack) == 0

    await wait_until(all_published, 30, "the queued events to be published")
    assert await stack.redis.xlen(stack.settings.event_stream_name) >= 1200
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:

        async def published_again() -> bool:  # the background probe closed the breaker
            answer = await client.post("/write", json={"key": "after", "value": "v"})
            return answer.json()["queued"] is False

        await wait_until(published_again, 10, "writes to be published at once again")
    await stack.assert_converges()


@pytest.mark.parametrize("hot_paths", ["true", "false"])
async def test_the_write_queue_is_bounded(stack: Stack, hot_paths: str) -> None:
    bound = 8
    api = await stack.launch("write-api", WRITE_QUEUE_MAX=str(bound), HOT_PATHS=hot_paths)
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        async with stack.write_engine.connect() as locker:
            await locker.execute(text("LOCK TABLE commands IN SHARE MODE"))  # INSERTs wait
            held = [
                asyncio.create_task(client.post("/write", json={"key": f"q{i}", "value": "v"}))
                for i in range(bound)
            ]

            async def full() -> bool:
                return await queue_depth(client) == bound

            await wait_until(full, 20, f"{bound} writes in hand")
            refused = await client.post("/write", json={"key": "one-past", "value": "v"}, timeout=5)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"].isdigit()
            assert refused.json()["error"] == "write_queue_full"
            await locker.rollback()
        answers = await asyncio.gather(*held)
    assert [a.status_code for a in answers] == [200] * bound
    assert await stack.scalar(stack.write_engine, "SELECT count(*) FROM commands") == bound


async def test_stats_count_a_published_write_at_once(stack: Stack) -> None:
    api = await stack.launch("write-api")
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        for i in range(50):
            answer = (await client.post("/write", json={"key": f"s{i}", "value": "v"})).json()
            assert answer["message"] == "Command written and event published"
            stats = (await client.get("/stats")).json()
            assert stats["events_published"] == i + 1, f"write {i}: {stats}"


@pytest_asyncio.fixture
async def proxy(write_pg: PostgresServer) -> AsyncIterator[PgProxy]:
    """A proxy in front of the write PostgreSQL server."""
    server = PgProxy(write_pg.port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def through(stack: Stack, write_pg: PostgresServer, proxy: PgProxy) -> str:
    """The stack's write DB URL, through the proxy."""
    url = stack.env["WRITE_DB_URL"]
    assert f":{write_pg.port}/" in url
    return url.replace(f":{write_pg.port}/", f":{proxy.port}/")


async def test_a_commit_whose_answer_was_lost_is_answered_with_its_position(
    stack: Stack, write_pg: PostgresServer, proxy: PgProxy
) -> None:
    api = await stack.launch("write-api", WRITE_DB_URL=through(stack, write_pg, proxy))
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        assert (await client.post("/write", json={"key": "warm", "value": "v"})).status_code == 200
        proxy.drop_after_insert()
        answer = await client.post("/write", json={"key": "lost", "value": "stored"})
    assert proxy.dropped.is_set()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    stored = await stack.scalar(
        stack.write_engine, "SELECT string_agg(id::text, ',') FROM commands WHERE key = 'lost'"
    )
    assert stored == str(body["position"])  # stored once, and the answer says where


async def test_a_write_cut_off_before_commit_is_known_not_stored(
    stack: Stack, write_pg: PostgresServer, proxy: PgProxy
) -> None:

    api = await stack.launch("write-api", WRITE_DB_URL=through(stack, write_pg, proxy))
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        assert (await client.post("/write", json={"key": "warm", "value": "v"})).status_code == 200
        async with stack.write_engine.connect() as locker:
            await locker.execute(text("LOCK TABLE commands IN SHARE MODE"))
            pending = asyncio.create_task(client.post("/write", json={"key": "cut", "value": "v"}))

            async def waiting() -> bool:
                sql = (
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO commands%'"
                )
                return bool(await stack.scalar(stack.write_engine, sql))

            await wait_until(waiting, 20, "the INSERT to wait on the lock")
            proxy.drop_clients()  # the session lives on, still waiting on the lock
            answer = await asyncio.wait_for(pending, 15)
            await locker.rollback()
    # The writing session was ended before it could commit: known not stored, a plain 503.
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "database_unavailable"
    assert (
        await stack.scalar(stack.write_engine, "SELECT count(*) FROM commands WHERE key = 'cut'")
        == 0
    )


async def test_an_unknown_commit_outcome_has_its_own_answer(
    stack: Stack, write_pg: PostgresServer, proxy: PgProxy
) -> None:
    api = await stack.launch(
        "write-api", WRITE_DB_URL=through(stack, write_pg, proxy), WRITE_OUTCOME_TIMEOUT="1"
    )
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        assert (await client.post("/write", json={"key": "warm", "value": "v"})).status_code == 200
        proxy.drop_after_insert()
        proxy.refuse = True  # and the write DB cannot be reached to find out
        started = time.monotonic()
        answer = await client.post("/write", json={"key": "unknown", "value": "v"})
        elapsed = time.monotonic() - started
        proxy.refuse = False
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "outcome_unknown"
    assert answer.headers["retry-after"].isdigit()
    assert elapsed < 5
    # It was in fact stored: a failure answer would have lied.
    assert (
        await stack.scalar(
            stack.write_engine, "SELECT count(*) FROM commands WHERE key = 'unknown'"
        )
        == 1
    )


async def test_a_backlog_of_large_values_is_published_in_bounded_pages(
    stack: Stack, redis_factory: Callable[[], RedisServer]
) -> None:

    redis = redis_factory()
    stack.use_redis(redis)
    page_bytes = 8_000_000
    api = await stack.launch("write-api", PUBLISHER_BATCH_MAX_BYTES=str(page_bytes))
    redis.stop()
    count, size = 300, 1_000_000  # 300 MB of values, 37 pages
    async with stack.write_engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO commands (key, value, event_type)"
                " SELECT 'big' || i, repeat(md5(i::text), :reps), 'RecordCreated'"
                " FROM generate_series(1, :n) AS i"
            ),
            {"reps": size // 32, "n": count},
        )
    assert await unpublished(stack) == count
    redis.start()  # back, empty

    async def all_published() -> bool:
        return await unpublished(stack) == 0

    await wait_until(all_published, 90, "the backlog to be published")
    assert await stack.redis.xlen(stack.settings.event_stream_name) >= count
    # One page of 8 values in memory at a time, not the whole 300 MB backlog.
    peak = peak_rss_mb(api.process.pid)
    assert peak < 200, f"write-api peak RSS {peak:.0f} MB"


async def test_a_stop_answers_every_write_in_hand_within_its_bound(stack: Stack) -> None:
    # The write DB takes nothing (a table lock: sent statements hang as on a hung server).
    api = await stack.launch("write-api", SHUTDOWN_TIMEOUT="2", WRITE_BATCH_MAX="16")
    limits = httpx.Limits(max_connections=60)
    async with httpx.AsyncClient(base_url=api.url, timeout=60, limits=limits) as client:
        assert (await client.post("/write", json={"key": "warm", "value": "v"})).status_code == 200
        async with stack.write_engine.connect() as locker:
            await locker.execute(text("LOCK TABLE commands IN ACCESS EXCLUSIVE MODE"))
            pending = [
                asyncio.create_task(client.post("/write", json={"key": f"s{i}", "value": "v"}))
                for i in range(50)
            ]

            async def all_in_hand() -> bool:
                return await queue_depth(client) >= 50

            await wait_until(all_in_hand, 20, "the writes to wait for the write DB")
            started = time.monotonic()
            # SIGTERM: bounded by SHUTDOWN_TIMEOUT (2 s), not by a statement's timeout.
            code = await asyncio.to_thread(api.terminate, 15)
            stopped = time.monotonic() - started
            answers = await asyncio.wait_for(asyncio.gather(*pending), 5)
            await locker.rollback()
    assert code in (0, -signal.SIGTERM), api.log()[-3000:]
    assert stopped < 2 + 2, f"stopped after {stopped:.1f}s"
    assert {a.status_code for a in answers} == {503}, [a.text for a in answers][:5]
    errors = [a.json()["error"] for a in answers]
    # The committing batch may be stored; the queued writes were never sent.
    assert errors.count("shutting_down") >= 50 - 16, errors
    assert set(errors) <= {"shutting_down", "outcome_unknown", "database_unavailable"}
    assert all(a.headers["retry-after"].isdigit() for a in answers)
    never_sent = [f"s{i}" for i, e in enumerate(errors) if e == "shutting_down"]
    stored = await stack.scalar(
        stack.write_engine, "SELECT count(*) FROM commands WHERE key = ANY(:keys)", keys=never_sent
    )
    assert stored == 0


async def test_the_breaker_closes_in_the_background_once_redis_is_back(
    stack: Stack, redis_factory: Callable[[], RedisServer]
) -> None:
    redis = redis_factory()
    stack.use_redis(redis)
    api = await stack.launch("write-api", REDIS_PROBE_INTERVAL="0.5")
    assert redis.process is not None
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            answer = await client.post("/write", json={"key": "hung", "value": "v"})
            assert answer.json()["queued"] is True  # the breaker is open now
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)

        async def closed() -> bool:  # no write comes: only a background probe can close it
            return "circuit closed dependency=redis" in api.log()

        await wait_until(closed, 0.5 + 1 + 3, "a background probe to close the breaker")
        answer = await client.post("/write", json={"key": "back", "value": "v"})
        assert answer.json()["queued"] is False  # the first write after: published at once


@pytest.fixture
def own_write_pg(server_root: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, to freeze."""
    server = PostgresServer(server_root / f"pg-own-{free_port()}", free_port(), durable=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def frozen(server: PostgresServer) -> list[psutil.Process]:
    """The server's postmaster and its children, to SIGSTOP (a hung host) and SIGCONT."""
    pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    return [postmaster, *postmaster.children(recursive=True)]


async def test_a_stop_with_the_write_db_hung_answers_within_its_bound(
    stack: Stack, own_write_pg: PostgresServer, fresh_names: str
) -> None:
    await asyncio.to_thread(own_write_pg.create_database, f"own_{fresh_names}")
    url = own_write_pg.url(f"own_{fresh_names}")
    engine = create_engine(url, stack.settings, application_name="test")
    try:
        await migrate(engine, "write")
    finally:
        await engine.dispose()
    api = await stack.launch(
        "write-api", WRITE_DB_URL=url, SHUTDOWN_TIMEOUT="2", WRITE_BATCH_MAX="16"
    )
    limits = httpx.Limits(max_connections=60)
    async with httpx.AsyncClient(base_url=api.url, timeout=60, limits=limits) as client:
        assert (await client.post("/write", json={"key": "warm", "value": "v"})).status_code == 200
        processes = frozen(own_write_pg)
        for process in processes:
            process.suspend()
        try:
            pending = [
                asyncio.create_task(client.post("/write", json={"key": f"h{i}", "value": "v"}))
                for i in range(50)
            ]

            async def all_in_hand() -> bool:
                return await queue_depth(client) >= 50

            await wait_until(all_in_hand, 20, "the writes to wait for the write DB")
            started = time.monotonic()
            code = await asyncio.to_thread(api.terminate, 15)
            stopped = time.monotonic() - started
            answers = await asyncio.wait_for(asyncio.gather(*pending), 5)
        finally:
            for process in processes:
                process.resume()
    assert code in (0, -signal.SIGTERM), api.log()[-3000:]
    assert stopped < 2 + 2, f"stopped after {stopped:.1f}s"
    assert {a.status_code for a in answers} == {503}, [a.text for a in answers][:5]
    errors = [a.json()["error"] for a in answers]
    assert set(errors) <= {"shutting_down", "outcome_unknown"}, errors
    assert errors.count("shutting_down") >= 50 - 16, errors
