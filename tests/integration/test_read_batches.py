"""Reads share SELECTs (read_db.RecordReader): at most READ_SELECT_CONCURRENCY run at a time,
and the reads that arrive meanwhile, over many turns of the event loop, go together in the
next one; each still gets its own record and count."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio
from sqlalchemy import text

from cqrs_stack import db
from cqrs_stack.read_db import ReadCounter, RecordReader
from tests.fixtures.stack import Stack, wait_until

KEYS = [f"k{i}" for i in range(6)]
# The SELECT of records, as pg_stat_activity shows it.
_WAITING_SELECTS = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'batches'"
    " AND wait_event_type = 'Lock' AND query LIKE 'SELECT key, value%'"
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
    assert [r["value"] if r else None for r in records] == KEYS
    assert all(r is not None and r["read_count"] == 1 for r in records)
