"""``read_count`` at its edges, on the real read DB and live read-api processes.

An answer adds the reads held in memory to the row's count. A SELECT during which a flush of
its key commits cannot know whether the row has the flushed reads yet, so it runs again
(read_db.RecordReader); a flush held mid-way (by a row lock taken from another connection)
delays no read.
Only a read answered with its record counts; memory is bounded during an outage; SIGTERM
stores every counted read; several replicas never hide a read once it is flushed.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from cqrs_stack import db
from cqrs_stack.localservers import PostgresServer, free_port
from cqrs_stack.migrations import migrate
from cqrs_stack.read_db import ReadCounter, RecordReader
from tests.fixtures.pgproxy import PgProxy
from tests.fixtures.stack import ServiceProcess, Stack, wait_until

_INSERT_RECORD = (
    "INSERT INTO records (key, value, created_at, updated_at, first_command_id,"
    " last_command_id) VALUES (:key, 'v', now(), now(), 1, 1)"
)


@pytest_asyncio.fixture
async def read_pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    """The hot paths' asyncpg pool on the stack's read DB, with one record ``k`` in it."""
    async with stack.read_engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO records (key, value, created_at, updated_at, first_command_id,"
                " last_command_id) VALUES ('k', 'v', now(), now(), 1, 1)"
            )
        )
    pool = await db.create_pool(stack.settings.read_db_url, stack.settings, application_name="t")
    yield pool
    await pool.close()


@asynccontextmanager
async def flush_held_by_a_row_lock(
    stack: Stack, counter: ReadCounter, reads: int
) -> AsyncIterator[asyncio.Task[int]]:
    """Count ``reads`` reads of k, lock k's row elsewhere and start a flush that waits on it.

    The lock is released when the block ends, and the flush is then awaited (bounded).
    """
    for _ in range(reads):
        counter.count("k")
    async with stack.read_engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(text("SELECT 1 FROM records WHERE key = 'k' FOR UPDATE"))
        flush = asyncio.create_task(counter.flush())
        try:
            await wait_until(
                _waiting_on_a_lock(stack, counter), 10, "the flush to wait on the lock"
            )
            yield flush
        finally:
            await blocker.commit()
    await asyncio.wait_for(flush, 10)


def _waiting_on_a_lock(stack: Stack, counter: ReadCounter) -> Callable[[], Awaitable[bool]]:
    async def waiting() -> bool:
        return counter.flushing and bool(
            await stack.scalar(
                stack.read_engine,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%UPDATE records SET read_count%'",
            )
        )

    return waiting


async def test_a_read_during_a_held_flush_answers_at_once(
    stack: Stack, read_pool: asyncpg.Pool
) -> None:
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = RecordReader(read_pool, counter)
    async with flush_held_by_a_row_lock(stack, counter, reads=3) as flush:
        # The row has none of the 3 yet and memory has all: no need to wait for the flush.
        record = await asyncio.wait_for(reader.get("k"), 0.1 + 0.05)
        assert record is not None
        assert record.read_count == 4
        assert not flush.done()
    assert flush.result() == 3
    record = await reader.get("k")
    assert record is not None
    assert record.read_count == 5  # the row has the 3, memory the 2 since: counted once
    assert counter.unflushed("k") == 2


@pytest_asyncio.fixture
async def slow_read_pool(
    stack: Stack, read_pg: PostgresServer, read_pool: asyncpg.Pool
) -> AsyncIterator[tuple[asyncpg.Pool, PgProxy]]:
    """A pool on the stack's read DB through a proxy that can hold the server's answers."""
    proxy = PgProxy(read_pg.port)
    await proxy.start()
    url = stack.settings.read_db_url
    assert f":{read_pg.port}/" in url
    url = url.replace(f":{read_pg.port}/", f":{proxy.port}/")
    pool = await db.create_pool(url, stack.settings, application_name="t")
    try:
        yield pool, proxy
    finally:
        await pool.close()
        await proxy.stop()


async def test_a_flush_committing_during_a_select_never_lowers_a_count(
    stack: Stack, slow_read_pool: tuple[asyncpg.Pool, PgProxy]
) -> None:
    pool, proxy = slow_read_pool
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = RecordReader(pool, counter)
    proxy.delay = 0.1  # each SELECT's answer arrives 0.1 s after it ran
    holding = True

    async def flush_often() -> None:
        while holding:
            await counter.flush()
            await asyncio.sleep(0.02)

    async def lock_again_and_again() -> None:
        # Flushes wait on the row lock, then commit when it is released: now and then while
        # a SELECT's answer is on the way.
        for _ in range(6):
            async with stack.read_engine.connect() as blocker:
                await blocker.begin()
                await blocker.execute(text("SELECT 1 FROM records WHERE key = 'k' FOR UPDATE"))
                await asyncio.sleep(0.5)
                await blocker.commit()
            await asyncio.sleep(0.03)

    flusher = asyncio.create_task(flush_often())
    locker = asyncio.create_task(lock_again_and_again())
    answers = []
    try:
        for _ in range(200):  # one sequential client
            if locker.done():
                break
            record = await asyncio.wait_for(reader.get("k"), 10)
            assert record is not None
            answers.append(record.read_count)
    finally:
        holding = False
        await asyncio.wait_for(locker, 20)
        await asyncio.wait_for(flusher, 10)
    # Each read of the one client rises by exactly one: none missed, none counted twice.
    assert answers == list(range(1, len(answers) + 1)), answers
    assert len(answers) >= 6


async def insert_records(stack: Stack, *keys: str) -> None:
    async with stack.read_engine.begin() as conn:
        for key in keys:
            await conn.execute(text(_INSERT_RECORD), {"key": key})


async def read_count(stack: Stack, key: str = "k") -> int:
    found = await stack.scalar(
        stack.read_engine, "SELECT read_count FROM records WHERE key = :key", key=key
    )
    return int(found)


async def read(client: httpx.AsyncClient, service: ServiceProcess, key: str = "k") -> int:
    """One read answered 200 with the record; its read_count."""
    answer = await client.get(f"{service.url}/read/{key}")
    assert answer.status_code == 200, answer.text
    return int(answer.json()["read_count"])


@pytest.fixture
def own_read_pg(server_root: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, to stop and start again."""
    server = PostgresServer(server_root / f"pg-own-{free_port()}", free_port(), durable=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_reads_answered_503_are_not_counted(
    stack: Stack, own_read_pg: PostgresServer, fresh_names: str
) -> None:
    await asyncio.to_thread(own_read_pg.create_database, f"own_{fresh_names}")
    url = own_read_pg.url(f"own_{fresh_names}")
    engine = db.create_engine(url, stack.settings, application_name="test")
    try:
        await migrate(engine, "read")
        async with engine.begin() as conn:
            await conn.execute(text(_INSERT_RECORD), {"key": "k"})
            await conn.execute(text(_INSERT_RECORD), {"key": "other"})
        reader = await stack.launch("read-api", READ_DB_URL=url)
        async with httpx.AsyncClient(timeout=10) as client:
            assert await read(client, reader) == 1
            await asyncio.to_thread(own_read_pg.stop)
            # Many reads of many keys during the outage: each answered 503, none counted.
            for i in range(20):
                key = "k" if i % 2 else f"missing-{i}"
                answer = await client.get(f"{reader.url}/read/{key}")
                assert answer.status_code == 503, answer.text
            await asyncio.to_thread(own_read_pg.start)
            await engine.dispose()  # the test's own connections died with the server

            async def answers() -> bool:
                return (await client.get(f"{reader.url}/read/other")).status_code == 200

            await wait_until(answers, 20, "the read DB to answer again")
            assert await read(client, reader) == 2  # the one read before, and this one

            async def flushed() -> bool:
                async with engine.connect() as conn:
                    stored = await conn.scalar(
                        text("SELECT read_count FROM records WHERE key = 'k'")
                    )
                return stored == 2

            await wait_until(flushed, 10, "the counts to be flushed")
    finally:
        await engine.dispose()


async def test_memory_for_counts_is_bounded_while_flushes_fail(stack: Stack) -> None:
    keys = [f"k{i}" for i in range(5)]
    await insert_records(stack, *keys)
    async with stack.read_engine.begin() as conn:
        for statement in (
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$",
            "CREATE TRIGGER refuse BEFORE UPDATE ON records FOR EACH ROW EXECUTE FUNCTION refuse()",
        ):
            await conn.execute(text(statement))
    reader = await stack.launch("read-api", READ_COUNT_MAX_KEYS="3")
    async with httpx.AsyncClient(timeout=10) as client:
        # Three keys fill the bound; a fourth and a fifth are answered but not counted.
        assert [await read(client, reader, key) for key in keys] == [1, 1, 1, 0, 0]
        assert await read(client, reader, "k0") == 2  # a key already held still counts
        async with stack.read_engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER refuse ON records"))

        async def flushed() -> bool:
            return await read_count(stack, "k0") == 2

        await wait_until(flushed, 10, "the held counts to be flushed")
        assert [await read_count(stack, key) for key in keys] == [2, 1, 1, 0, 0]
        metrics = (await client.get(f"{reader.url}/metrics")).text
    assert re.search(r"cqrs_read_counts_dropped_total 2\.0", metrics), metrics
    assert "reads not counted, too many keys wait for a flush dropped=2 max_keys=3" in reader.log()


async def test_a_row_lock_on_one_key_slows_no_read(stack: Stack) -> None:
    await insert_records(stack, "k", "other")
    async with stack.read_engine.begin() as conn:
        await conn.execute(text("INSERT INTO applied_commands VALUES (1)"))
    reader = await stack.launch("read-api")
    async with stack.read_engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(text("SELECT 1 FROM records WHERE key = 'k' FOR UPDATE"))
        async with httpx.AsyncClient(timeout=10) as client:
            assert await read(client, reader) == 1
            await wait_until(_flush_waits_on_a_lock(stack), 10, "a flush to wait on the row lock")
            for key in ("other", "k", "other", "k"):
                started = time.monotonic()
                # A wait of 0 on a reached position: only the SELECT's own time, well under
                # READ_WAIT_GRACE (0.25 s), whatever flush waits on a lock.
                answer = await client.get(
                    f"{reader.url}/read/{key}", params={"position": 1, "timeout": 0}
                )
                elapsed = time.monotonic() - started
                assert answer.status_code == 200, answer.text
                assert elapsed < 0.2, f"{key}: {elapsed:.2f}s"
            assert await read(client, reader) == 4  # k: 1 held in the flush, 3 since
        await blocker.commit()


async def test_sigterm_stores_the_reads_of_a_flush_held_by_a_lock(stack: Stack) -> None:
    await insert_records(stack, "k")
    reader = await stack.launch("read-api", SHUTDOWN_TIMEOUT="20")
    async with stack.read_engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(text("SELECT 1 FROM records WHERE key = 'k' FOR UPDATE"))
        async with httpx.AsyncClient(timeout=10) as client:
            answers = [await read(client, reader) for _ in range(10)]
        assert answers == list(range(1, 11))
        await wait_until(_flush_waits_on_a_lock(stack), 10, "a flush to wait on the row lock")
        reader.process.send_signal(signal.SIGTERM)

        async def stopping() -> bool:
            return "Waiting for application shutdown" in reader.log()

        await wait_until(stopping, 10, "the read API to begin its stop")
        await asyncio.sleep(1)  # the stop must wait for the held flush, not cancel it
        assert reader.process.poll() is None
        await blocker.commit()
    code = await asyncio.to_thread(reader.process.wait, 30)
    assert code in (0, -signal.SIGTERM)
    assert await read_count(stack) == 10


async def test_sigterm_waits_for_a_held_flush_at_most_shutdown_timeout(stack: Stack) -> None:
    await insert_records(stack, "k")
    reader = await stack.launch("read-api", SHUTDOWN_TIMEOUT="1")
    async with stack.read_engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(text("SELECT 1 FROM records WHERE key = 'k' FOR UPDATE"))
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                await read(client, reader)
        await wait_until(_flush_waits_on_a_lock(stack), 10, "a flush to wait on the row lock")
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(reader.process.wait, 30)
        assert loop.time() - started < 1 + 2  # the bound, plus the process's own exit
        await blocker.rollback()
    assert "read counts not stored" in reader.log() and "reads=3" in reader.log()


def _flush_waits_on_a_lock(stack: Stack) -> Callable[[], Awaitable[bool]]:
    async def waiting() -> bool:
        return bool(
            await stack.scalar(
                stack.read_engine,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%UPDATE records SET read_count%'",
            )
        )

    return waiting


async def test_two_replicas_never_hide_a_flushed_read(stack: Stack) -> None:
    """What the README promises across replicas: a replica's answer never falls below an
    answer another replica gave before its last flush; within one replica every read adds 1."""
    await insert_records(stack, "k")
    first = await stack.launch("read-api")
    second = await stack.launch("read-api")
    total = 0
    async with httpx.AsyncClient(timeout=10) as client:
        for round_ in range(4):
            for service in (first, second):
                # Bursts through one replica: each answer is one more than the one before.
                burst = [await read(client, service) for _ in range(3)]
                total += 3
                assert burst == [burst[0], burst[0] + 1, burst[0] + 2]

                async def flushed(expected: int = total) -> bool:
                    return await read_count(stack) == expected

                # Once the replica's reads are flushed, no replica answers less than it did.
                await wait_until(flushed, 10, f"round {round_}: the reads to be flushed")
                assert burst[-1] <= total
                other = second if service is first else first
                assert await read(client, other) > burst[-1]
                total += 1
