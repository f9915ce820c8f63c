"""``GET /read/{key}?position=P&timeout=S`` answers within S plus READ_WAIT_GRACE, whatever
the read DB is doing: every query of the wait and the final read are bounded by the time left.

A lock held in an open transaction on the read DB blocks the position query (on
``applied_commands``) or the read itself (on ``records``); without the bound, one query would
wait for the lock, or for the 30-second statement timeout.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from sqlalchemy import text

from tests.fixtures.stack import ServiceProcess, Stack

# READ_WAIT_GRACE's default: the most a final read may add once the wait ran out.
GRACE = 0.25
# What an answer may take beyond S: the grace, plus HTTP and scheduling on a busy machine.
SLACK = 0.5


@asynccontextmanager
async def table_locked(stack: Stack, table: str) -> AsyncIterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on ``table`` in an open transaction of the read DB."""
    async with stack.read_engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        try:
            yield
        finally:
            await blocker.rollback()


async def setup(stack: Stack) -> ServiceProcess:
    """A read API with record ``k`` whose command (position 1) is applied."""
    async with stack.read_engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO records (key, value, created_at, updated_at, first_command_id,"
                " last_command_id) VALUES ('k', 'v', now(), now(), 1, 1)"
            )
        )
        await conn.execute(text("INSERT INTO applied_commands VALUES (1)"))
    return await stack.launch("read-api")


async def timed_read(service: ServiceProcess, query: str) -> tuple[httpx.Response, float]:
    async with httpx.AsyncClient(timeout=30) as client:
        started = time.monotonic()
        answer = await client.get(f"{service.url}/read/k?{query}")
        return answer, time.monotonic() - started


@pytest.mark.parametrize("seconds", [0, 1])
async def test_a_position_query_behind_a_lock_answers_not_reached_in_time(
    stack: Stack, seconds: float
) -> None:
    reader = await setup(stack)
    async with table_locked(stack, "applied_commands"):
        answer, took = await timed_read(reader, f"position=1&timeout={seconds}")
    assert took < max(seconds, GRACE) + SLACK, took
    assert answer.status_code == 200
    body = answer.json()
    assert body["position_reached"] is False  # applied, but the wait could not see it
    assert body["value"] == "v" and body["read_count"] == 1


async def test_a_read_behind_a_lock_answers_503_in_time(stack: Stack) -> None:
    reader = await setup(stack)
    async with table_locked(stack, "records"):
        answer, took = await timed_read(reader, "position=1&timeout=1")
    assert took < 1 + SLACK, took
    assert answer.status_code == 503
    assert answer.json()["error"] == "database_unavailable"
    # The read that could not run is not a read: the next one is the first counted.
    again, _ = await timed_read(reader, "position=1&timeout=1")
    assert again.status_code == 200
    assert again.json()["position_reached"] is True and again.json()["read_count"] == 1


async def test_a_wait_that_reaches_its_position_reads_at_once(stack: Stack) -> None:
    reader = await setup(stack)
    answer, took = await timed_read(reader, "position=1&timeout=5")
    assert took < 1
    assert answer.json()["position_reached"] is True
    missing, took = await timed_read(reader, "position=2&timeout=1")
    assert 1 <= took < 1 + SLACK
    assert missing.json()["position_reached"] is False
