"""A read's ``read_count`` while a read-count flush commits, on the real read DB.

An answer adds the reads held in memory to the row's count. A SELECT that overlaps a flush
cannot know whether the row has the flushed reads yet, so it runs again once the flush is done
(read_db.RecordReader). The flush is held mid-way by a row lock taken from another connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest_asyncio
from sqlalchemy import text

from cqrs_stack import db
from cqrs_stack.read_db import ReadCounter, RecordReader
from tests.fixtures.stack import Stack, wait_until


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
        return counter.flush_mark() is None and bool(
            await stack.scalar(
                stack.read_engine,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%UPDATE records SET read_count%'",
            )
        )

    return waiting


async def test_a_read_during_a_flush_answers_after_it(
    stack: Stack, read_pool: asyncpg.Pool
) -> None:
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = RecordReader(read_pool, counter)
    async with flush_held_by_a_row_lock(stack, counter, reads=3) as flush:
        read = asyncio.create_task(reader.get("k"))
        # The read waits for the held flush (its retries take 0.3 s before it gives up).
        done, _ = await asyncio.wait({read}, timeout=0.2)
        assert not done
    assert flush.result() == 3
    record = await asyncio.wait_for(read, 10)

    assert record is not None
    # Selected again after the flush: the row has the 3, memory only this read: counted once.
    assert record["read_count"] == 4
    assert counter.unflushed("k") == 1


async def test_a_flush_stuck_on_locks_does_not_hold_reads_for_long(
    stack: Stack, read_pool: asyncpg.Pool
) -> None:
    counter = ReadCounter(stack.read_engine, interval=3600)
    reader = RecordReader(read_pool, counter)
    async with flush_held_by_a_row_lock(stack, counter, reads=2):
        record = await asyncio.wait_for(reader.get("k"), 5)  # bounded retries, then answers
        assert record is not None
        assert record["read_count"] == 3  # 2 in the held flush, this one pending
