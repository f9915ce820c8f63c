"""Database outages are waited out, never dead-lettered: only a refused entry counts.

Each test makes a real PostgreSQL error happen to the projector's batch while it is held on a
lock, with PROJECTOR_MAX_DELIVERIES=1 so that a single miscounted delivery would dead-letter.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.fixtures.stack import ServiceProcess, Stack, wait_until
from tests.integration.test_guarantees import write_many

ONE_DELIVERY = {"PROJECTOR_MAX_DELIVERIES": "1", "PROJECTOR_CATCHUP_INTERVAL": "3600"}

_BLOCKED_BATCH = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = 'cqrs-projector'"
    " AND wait_event_type = 'Lock' AND query LIKE '%applied_commands%'"
)


async def _assert_nothing_dead_lettered(stack: Stack, projector: ServiceProcess) -> None:
    await stack.assert_converges()
    assert await stack.redis.xlen(stack.settings.dead_letter_stream) == 0
    assert "dead-lettered" not in projector.log()


async def test_a_terminated_connection_is_an_outage(stack: Stack) -> None:
    api = await stack.launch("api")
    projector = await stack.launch("projector", **ONE_DELIVERY)
    async with stack.read_engine.connect() as blocker:
        await blocker.execute(text("LOCK TABLE records IN EXCLUSIVE MODE"))
        await write_many(api.url, 20)
        for attempt in range(3):  # SQLSTATE 57P01, again and again on the retried batch

            async def blocked() -> bool:
                return bool(await stack.scalar(stack.read_engine, _BLOCKED_BATCH))

            await wait_until(blocked, 20, f"the batch to block (attempt {attempt})")
            await stack.scalar(
                stack.read_engine, f"SELECT pg_terminate_backend(pid) FROM ({_BLOCKED_BATCH}) b"
            )
        await blocker.rollback()
    await _assert_nothing_dead_lettered(stack, projector)
    # asyncpg reports the server's 57P01 as the connection closing (08003), with its message.
    assert "administrator command" in projector.log()


@pytest.mark.parametrize(
    ("setting", "sqlstate"), [("statement_timeout", "57014"), ("lock_timeout", "55P03")]
)
async def test_a_timed_out_statement_is_an_outage(
    stack: Stack, setting: str, sqlstate: str
) -> None:
    database = await stack.scalar(stack.read_engine, "SELECT current_database()")
    async with stack.read_engine.begin() as conn:
        # For every new session of the read DB: the projector's batches time out while held.
        await conn.execute(text(f'ALTER DATABASE "{database}" SET {setting} = 300'))
    api = await stack.launch("api")
    projector = await stack.launch("projector", **ONE_DELIVERY)
    async with stack.read_engine.connect() as blocker:
        await blocker.execute(text("SET lock_timeout = 0"))
        await blocker.execute(text("SET statement_timeout = 0"))
        await blocker.execute(text("LOCK TABLE records IN EXCLUSIVE MODE"))
        await write_many(api.url, 20)

        async def timed_out_twice() -> bool:
            dead = await stack.redis.xlen(stack.settings.dead_letter_stream)
            return dead > 0 or projector.log().count(f"sqlstate={sqlstate}") >= 2

        await wait_until(timed_out_twice, 20, f"the batch to fail with {sqlstate} twice")
        assert await stack.redis.xlen(stack.settings.dead_letter_stream) == 0
        await blocker.rollback()
    await _assert_nothing_dead_lettered(stack, projector)
