"""A command the read DB refuses never stalls the catch-up sweep.

The poison is made by a CHECK constraint on the read model (SQLSTATE 23514); commands are
lost from the stream by writing them with SQL straight into the write DB, so only the sweep
can bring them to the read model. The sweep applies the commands around a refused one,
dead-letters it once (whichever of stream and sweep comes first), and moves its cursor past
it; an outage dead-letters nothing, and Redis down keeps the refused command in the sweep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from cqrs_stack import dead_letters
from cqrs_stack.db import create_pool
from cqrs_stack.localservers import free_port
from cqrs_stack.projector import Projector
from tests.fixtures.stack import Stack, wait_until
from tests.integration.test_dead_letters import _applied, _execute, _write

MIB = 1024 * 1024
_POISON_CHECK = "ALTER TABLE records ADD CONSTRAINT no_poison CHECK (value NOT LIKE 'poison%')"
_FIX = "ALTER TABLE records DROP CONSTRAINT no_poison"


async def _lose(stack: Stack, rows: list[tuple[str, str]]) -> list[int]:
    """Store commands (key, value SQL) the stream never carries, stamped past the grace."""
    positions = []
    async with stack.write_engine.begin() as conn:
        for key, value_sql in rows:
            position = await conn.scalar(
                text(
                    "INSERT INTO commands (key, value, event_type, created_at)"
                    f" VALUES (:key, {value_sql}, 'RecordCreated', now() - interval '10 s')"
                    " RETURNING id"
                ),
                {"key": key},
            )
            positions.append(int(position))
    return positions


async def _lose_many(stack: Stack, count: int, poison_at: int) -> int:
    """``count`` small commands in one transaction, the ``poison_at``-th (from 1) refused."""
    async with stack.write_engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO commands (key, value, event_type, created_at)"
                " SELECT 'm' || i, CASE WHEN i = :p THEN 'poison' ELSE 'v' || i END,"
                " 'RecordCreated', now() - interval '10 s' FROM generate_series(1, :n) AS i"
                " ORDER BY i"
            ),
            {"n": count, "p": poison_at},
        )
        return int(
            await conn.scalar(
                text("SELECT id FROM commands WHERE key = :k"), {"k": f"m{poison_at}"}
            )
        )


async def _cursor(stack: Stack) -> int:
    return int(
        await stack.scalar(
            stack.read_engine,
            "SELECT coalesce(max(cursor_id), 0) FROM projector_catchup WHERE model = 'records'",
        )
    )


async def _pending(stack: Stack) -> int:
    return int(
        await stack.scalar(
            stack.read_engine,
            "SELECT count(*) FROM projector_catchup_pending WHERE model = 'records'",
        )
    )


async def _letters(stack: Stack) -> list[dead_letters.DeadLetter]:
    return (await dead_letters.list_page(stack.redis, stack.settings)).entries


async def _records(stack: Stack) -> int:
    return int(await stack.scalar(stack.read_engine, "SELECT count(*) FROM records"))


@asynccontextmanager
async def _projector(stack: Stack, redis: Redis | None = None) -> AsyncIterator[Projector]:
    """A projector in this process, to run sweeps one at a time (``catch_up``)."""
    settings = stack.settings
    pool: asyncpg.Pool = await create_pool(settings.read_db_url, settings, application_name="t")
    try:
        yield Projector(settings, stack.write_engine, stack.read_engine, pool, redis or stack.redis)
    finally:
        await pool.close()


async def test_a_refused_command_never_stalls_the_sweep(stack: Stack) -> None:
    stack.env["READ_MODELS"] = "records,history"
    await _execute(stack, _POISON_CHECK)
    await stack.launch("projector")  # sweeps every PROJECTOR_CATCHUP_INTERVAL (0.5 s)
    poison, healthy = await _lose(stack, [("p", "'poison'"), ("h", "'fine'")])

    async def healthy_applied() -> bool:
        return await _applied(stack, "h") == (1, 1, 1)

    await wait_until(healthy_applied, 15, "the command after the refused one to be swept")
    letters = await _letters(stack)
    assert [(d.key, d.position) for d in letters] == [("p", poison)]
    assert letters[0].reason.startswith("read DB refused the command (catch-up sweep")
    assert await _cursor(stack) >= healthy

    # Later sweeps pass it: no second dead letter, and nothing stays pending.
    swept = await stack.scalar(stack.read_engine, "SELECT max(swept_at) FROM projector_catchup")

    async def swept_again() -> bool:
        return await stack.scalar(
            stack.read_engine, "SELECT min(swept_at) > :t FROM projector_catchup", t=swept
        )

    await wait_until(swept_again, 10, "two more sweeps")
    await wait_until(swept_again, 10, "two more sweeps")
    assert len(await _letters(stack)) == 1 and await _pending(stack) == 0

    # Fixed and retried: applied once, to every model, and the dead letter gone.
    await _execute(stack, _FIX)
    engines = (stack.redis, stack.write_engine, stack.read_engine, stack.settings)
    outcome = await dead_letters.retry(*engines, letters[0].entry_id)
    assert (outcome.result, outcome.position) == ("applied", poison)
    await wait_until(swept_again, 10, "another sweep")
    assert await _applied(stack, "p") == (1, 1, 1)
    assert await _letters(stack) == []
    await stack.assert_converges(10)


async def test_a_poison_both_streamed_and_swept_is_dead_lettered_once(stack: Stack) -> None:
    stack.env["READ_MODELS"] = "records,history"
    await _execute(stack, _POISON_CHECK)
    api = await stack.launch("api")
    await stack.launch("projector", PROJECTOR_MAX_DELIVERIES="2", PROJECTOR_CLAIM_IDLE_MS="200")
    poison = await _write(api.url, "p", "poison")
    healthy = await _write(api.url, "h", "fine")

    async def stream_done() -> bool:
        settings = stack.settings
        info = await stack.redis.xpending(settings.event_stream_name, settings.consumer_group)
        return int(info["pending"]) == 0 and await _cursor(stack) >= healthy

    # Both paths meet the poison (redelivery every 0.2 s, sweep every 0.5 s); one letter.
    await wait_until(stream_done, 20, "the stream entry acknowledged and the sweep past it")
    swept = await stack.scalar(stack.read_engine, "SELECT max(swept_at) FROM projector_catchup")

    async def swept_again() -> bool:
        return await stack.scalar(
            stack.read_engine, "SELECT min(swept_at) > :t FROM projector_catchup", t=swept
        )

    await wait_until(swept_again, 10, "another sweep")
    assert [d.position for d in await _letters(stack)] == [poison]
    assert await _applied(stack, "h") == (1, 1, 1)


@pytest.mark.parametrize("poison_at", [4, 5], ids=["last-of-a-page", "first-of-the-next"])
async def test_a_poison_at_a_byte_page_bound(stack: Stack, poison_at: int) -> None:
    # 256 KiB a command (key of 3 bytes): four fill a page of 1 MiB exactly.
    stack.env["PROJECTOR_BATCH_MAX_BYTES"] = str(MIB)
    await _execute(stack, _POISON_CHECK)
    rows = [
        (
            f"k{i:02d}",
            f"'{'poison' if i == poison_at else 'valuex'}' || repeat('v', {MIB // 4 - 9})",
        )
        for i in range(1, 9)
    ]
    positions = await _lose(stack, rows)
    async with _projector(stack) as projector:
        assert await projector.catch_up() == 7
        assert [d.position for d in await _letters(stack)] == [positions[poison_at - 1]]
        assert await _cursor(stack) == positions[-1] and await _pending(stack) == 0
        assert await projector.catch_up() == 0  # passed: not tried again
    assert len(await _letters(stack)) == 1 and await _records(stack) == 7


@pytest.mark.parametrize("offset", [0, 1], ids=["last-of-a-scan", "first-of-the-next"])
async def test_a_poison_at_the_scan_page_bound(stack: Stack, offset: int) -> None:
    async with _projector(stack) as projector:
        limit = max(50_000, 4 * stack.settings.write_batch_max)  # catch_up's page of candidates
        await _execute(stack, _POISON_CHECK)
        poison = await _lose_many(stack, limit + 3, limit + offset)
        applied = 0
        for _ in range(3):  # a page of `limit` per round: two rounds, and one finding nothing
            applied += await projector.catch_up()
    assert applied == limit + 2
    assert [d.position for d in await _letters(stack)] == [poison]
    assert await _pending(stack) == 0 and await _records(stack) == limit + 2


async def test_a_read_db_timeout_dead_letters_nothing(stack: Stack) -> None:
    await _execute(stack, _POISON_CHECK)
    poison, healthy = await _lose(stack, [("p", "'poison'"), ("h", "'fine'")])
    database = stack.settings.read_db_url.rsplit("/", 1)[-1].split("?")[0]
    # The projector's connections (opened after this) time out waiting for the held lock.
    await _execute(stack, f"ALTER DATABASE {database} SET statement_timeout = '300ms'")
    async with _projector(stack) as projector:
        async with stack.read_engine.connect() as locker:
            await locker.execute(text("SET statement_timeout = 0"))  # begins its transaction
            await locker.execute(text("LOCK TABLE records IN ACCESS EXCLUSIVE MODE"))
            for _ in range(2):  # the round fails each time, and nothing is dead-lettered
                with pytest.raises(DBAPIError, match="statement timeout"):
                    await projector.catch_up()
            assert await _letters(stack) == [] and await _cursor(stack) < poison
            await locker.rollback()
        assert await projector.catch_up() == 1
    assert [d.position for d in await _letters(stack)] == [poison]
    assert await _cursor(stack) == healthy


async def test_redis_down_keeps_the_poison_in_the_sweep(stack: Stack) -> None:
    stack.env["READ_MODELS"] = "records,history"
    await _execute(stack, _POISON_CHECK)
    poisons = [("p", "'poison'"), ("q", "'poison'"), ("h1", "'fine'")]
    [poison, other, _] = await _lose(stack, poisons)  # one transaction: one pending
    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        async with _projector(stack, down) as projector:
            assert await projector.catch_up() == 1  # the healthy one, Redis or not
            assert await _letters(stack) == [] and await _pending(stack) == 1
            [second] = await _lose(stack, [("h2", "'fine'")])
            assert await projector.catch_up() == 1  # still kept, and the sweep goes on
            assert await _cursor(stack) == second and await _pending(stack) == 1
            projector.redis = stack.redis  # Redis is back
            assert await projector.catch_up() == 0
            assert await projector.catch_up() == 0
    finally:
        await down.aclose()
    letters = await _letters(stack)
    assert [d.position for d in letters] == [poison, other] and await _pending(stack) == 0
    assert await _applied(stack, "h1") == (1, 1, 1) == await _applied(stack, "h2")

    await _execute(stack, _FIX)
    engines = (stack.redis, stack.write_engine, stack.read_engine, stack.settings)
    outcomes = await dead_letters.retry_all(*engines)
    assert [o.result for o in outcomes] == ["applied", "applied"]
    async with _projector(stack) as projector:
        assert await projector.catch_up() == 0
    assert await _applied(stack, "p") == (1, 1, 1) == await _applied(stack, "q")
    await stack.assert_converges(10)
