"""Reads share SELECTs (read_db.RecordReader): at most READ_SELECT_CONCURRENCY run at a time,
and the reads that arrive meanwhile, over many turns of the event loop, go together in the
next one; each still gets its own record and count."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from cqrs_stack import db
from cqrs_stack.read_api import found_json
from cqrs_stack.read_db import ReadCounter, RecordReader
from tests.fixtures.stack import Stack, wait_until

KEYS = [f"k{i}" for i in range(6)]
# The SELECT of records, as pg_stat_activity shows it.
_WAITING_SELECTS = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'batches'"
    " AND wait_event_type = 'Lock' AND query LIKE 'SELECT key, read_count, write_count%'"
)


@pytest_asyncio.fixture
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    """The hot paths' asyncpg pool on the stack's read DB, with records KEYS in it."""
    async with stack.read_engine.begin() as conn:
        for key in KEYS:
            await conn.execute(
                text(
                    "INSERT INTO records (key, value, created_at, updated_at, first_command_id,"
                    " last_command_id) VALUES (:key, :key, now(), now(), 1, 1)"
                ),
                {"key": key},
            )
    pool = await db.create_pool(
        stack.settings.read_db_url, stack.settings, application_name="batches"
    )
    yield pool
    await pool.close()


async def waiting_selects(stack: Stack) -> int:
    async with stack.read_engine.connect() as conn:
        return int(await conn.scalar(text(_WAITING_SELECTS)) or 0)


async def test_reads_beyond_the_running_selects_wait_and_share_the_next(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = RecordReader(pool, counter, concurrency=2)
    async with stack.read_engine.connect() as blocker:
        await blocker.begin()
        # Every SELECT of records waits on this lock until the transaction ends.
        await blocker.execute(text("LOCK TABLE records IN ACCESS EXCLUSIVE MODE"))
        reads = []
        for key in KEYS:  # one read per turn of the event loop: each turn could start one
            reads.append(asyncio.create_task(reader.get(key)))
            await asyncio.sleep(0.05)

        async def two_waiting() -> bool:
            return await waiting_selects(stack) == 2

        await wait_until(two_waiting, 10, "two SELECTs waiting on the lock")
        await asyncio.sleep(0.3)  # time enough for a third SELECT to show, were one started
        assert await waiting_selects(stack) == 2  # the bound, not one per turn
        await blocker.rollback()
    records = await asyncio.wait_for(asyncio.gather(*reads), 10)
    assert [json.loads(found_json(r, None))["value"] if r else None for r in records] == KEYS
    assert all(r is not None and r.read_count == 1 for r in records)


class _SizedReader(RecordReader):
    """A RecordReader that notes how many keys each SELECT carried."""

    sizes: list[int]

    async def _select(self, keys: list[str]) -> tuple[list[asyncpg.Record], Counter[str]]:
        self.sizes.append(len(keys))
        return await super()._select(keys)


def _sized(pool: asyncpg.Pool, counter: ReadCounter, max_keys: int) -> _SizedReader:
    reader = _SizedReader(pool, counter, concurrency=1, max_keys=max_keys)
    reader.sizes = []
    return reader


@asynccontextmanager
async def selects_held(stack: Stack) -> AsyncIterator[None]:
    """Every SELECT of records waits on a table lock until the block ends."""
    async with stack.read_engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(text("LOCK TABLE records IN ACCESS EXCLUSIVE MODE"))
        try:
            yield
        finally:
            await blocker.rollback()


async def _stored_reads(stack: Stack) -> int:
    """The read counts stored for KEYS, summed."""
    return int(
        await stack.scalar(
            stack.read_engine,
            "SELECT coalesce(sum(read_count), 0) FROM records WHERE key = ANY(:keys)",
            keys=KEYS,
        )
    )


async def _waiting(stack: Stack, count: int) -> None:
    async def there() -> bool:
        return await waiting_selects(stack) == count

    await wait_until(there, 10, f"{count} SELECT(s) waiting on the lock")


async def test_a_select_carries_at_most_read_batch_max_keys(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = _sized(pool, counter, max_keys=3)
    async with selects_held(stack):
        first = asyncio.create_task(reader.get(KEYS[0]))
        await _waiting(stack, 1)  # the one SELECT allowed runs (waits): the rest queue
        # Three keys (the bound), one past it, and the first key again (it joins its read).
        order = [KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[1]]
        queued = [asyncio.create_task(reader.get(key)) for key in order]
        await asyncio.sleep(0)
    answers = await asyncio.wait_for(asyncio.gather(first, *queued), 10)
    assert reader.sizes == [1, 3, 1]
    values = [json.loads(found_json(a, None))["value"] if a else None for a in answers]
    assert values == [KEYS[0], *order]
    assert [a.read_count if a else None for a in answers] == [1, 1, 1, 1, 1, 2]
    assert await counter.flush() == 6
    stored = await _stored_reads(stack)
    assert stored == 6  # the stored count is the number of answers


async def test_many_reads_of_one_and_of_many_keys_are_each_counted(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = _sized(pool, counter, max_keys=1000)
    async with selects_held(stack):
        first = asyncio.create_task(reader.get(KEYS[0]))
        await _waiting(stack, 1)
        same = [asyncio.create_task(reader.get(KEYS[5])) for _ in range(200)]
        spread = [asyncio.create_task(reader.get(KEYS[i % 5])) for i in range(100)]
        await asyncio.sleep(0)
    answers = await asyncio.wait_for(asyncio.gather(*same, *spread, first), 10)
    assert reader.sizes == [1, 6]  # all 300 in one SELECT
    assert sorted(a.read_count for a in answers[:200] if a) == list(range(1, 201))
    assert all(a is not None for a in answers)
    assert await counter.flush() == 301
    stored = await _stored_reads(stack)
    assert stored == 301


async def test_a_client_gone_mid_batch_is_not_counted(stack: Stack, pool: asyncpg.Pool) -> None:
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = _sized(pool, counter, max_keys=1000)
    async with selects_held(stack):
        first = asyncio.create_task(reader.get(KEYS[0]))
        await _waiting(stack, 1)
        reads = [asyncio.create_task(reader.get(KEYS[1])) for _ in range(3)]
        await asyncio.sleep(0)
        reads[1].cancel()  # its client went away while its SELECT waits
        first.cancel()  # and one whose SELECT is running
    done = await asyncio.wait_for(asyncio.gather(first, *reads, return_exceptions=True), 10)
    assert isinstance(done[0], asyncio.CancelledError)
    assert isinstance(done[2], asyncio.CancelledError)
    assert [d.read_count for d in (done[1], done[3])] == [1, 2]  # type: ignore[union-attr]
    assert await reader.get(KEYS[5]) is not None  # after the batches above: none runs now
    assert counter.unflushed(KEYS[0]) == 0 and counter.unflushed(KEYS[1]) == 2


async def test_a_slow_read_db_fails_every_waiter_of_a_batch_in_its_time(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = _sized(pool, counter, max_keys=1000)
    loop = asyncio.get_running_loop()
    async with selects_held(stack):
        first = asyncio.create_task(reader.get(KEYS[0], 0.5))
        await _waiting(stack, 1)
        started = loop.time()
        waiters = [asyncio.create_task(reader.get(KEYS[i % 3], 0.5)) for i in range(5)]
        done = await asyncio.wait_for(asyncio.gather(first, *waiters, return_exceptions=True), 10)
        took = loop.time() - started
    assert await reader.get(KEYS[5]) is not None  # after the batches above: none runs now
    # The same error as a lone read that times out (answered 503), each within its bound.
    assert all(isinstance(d, OperationalError) for d in done), done
    assert took < 0.5 + 0.4
    assert all(counter.unflushed(key) == 0 for key in KEYS[:5])  # none of them counted


async def test_a_read_db_gone_mid_batch_fails_every_waiter(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = RecordReader(pool, counter, concurrency=1)
    async with selects_held(stack):
        reads = [asyncio.create_task(reader.get(KEYS[i % 3])) for i in range(6)]
        await _waiting(stack, 1)
        # The batch's connection is cut (a server restarted, a proxy gone): one error, for all.
        await stack.scalar(
            stack.read_engine,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'batches' AND wait_event_type = 'Lock'",
        )
        done = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
    assert all(isinstance(d, DBAPIError) for d in done), done  # answered 503 (errors.py)
    assert len({id(d) for d in done}) == 1  # the batch's one failure, as a lone read gets it
    assert all(counter.unflushed(key) == 0 for key in KEYS)
