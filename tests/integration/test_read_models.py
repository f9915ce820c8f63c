"""The guarantees every read model must keep, run against each registered ``Projection``.

As ``eventsourcing`` runs one test case class against every recorder, each test here is
parametrised over ``projections.registered()``: a new model is checked by this suite as soon as
its module exists. Commands are seeded in the write DB with SQL and applied to the real read
DB as the projector applies them (``apply_batch``): duplicated, shuffled, from several
connections at once, across a crash, across the ledger's pruning boundary, then rebuilt and
verified. Each ends with the model equal to its pure function of the write DB.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text

from cqrs_stack.config import plain_database_url
from cqrs_stack.db import create_pool
from cqrs_stack.events import Command
from cqrs_stack.projections import Projection, apply_batch, registered
from cqrs_stack.projections.base import applied_count
from cqrs_stack.projections.ledger import LedgerPruner
from cqrs_stack.rebuild import rebuild
from cqrs_stack.verify import actual_model, compare, differences
from tests.fixtures.stack import Stack

MODELS = list(registered().values())


@pytest.fixture(params=MODELS, ids=[m.name for m in MODELS])
def model(request: pytest.FixtureRequest) -> type[Projection]:
    """Each registered read model in turn."""
    return request.param  # type: ignore[no-any-return]


@pytest_asyncio.fixture
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the stack's read DB, as a projector holds one."""
    result = await create_pool(stack.settings.read_db_url, stack.settings, application_name="t")
    try:
        yield result
    finally:
        await result.close()


async def seed(stack: Stack, count: int, keys: int, prefix: str = "k") -> list[Command]:
    """``count`` commands over ``keys`` keys, inserted with SQL, as the write DB has them."""
    async with stack.write_engine.begin() as conn:
        rows = await conn.execute(
            text(
                "INSERT INTO commands (key, value, event_type, published)"
                " SELECT :prefix || (i % :keys), 'v' || i,"
                " CASE WHEN i < :keys THEN 'RecordCreated' ELSE 'RecordUpdated' END, true"
                " FROM generate_series(0, :n - 1) AS i"
                " RETURNING id, key, value, event_type, created_at"
            ),
            {"prefix": prefix, "keys": keys, "n": count},
        )
        return sorted((Command(*row) for row in rows), key=lambda c: c.position)


async def deliver(
    pool: asyncpg.Pool,
    models: Sequence[type[Projection]],
    commands: Sequence[Command],
    seed_: int,
    replicas: int = 3,
) -> None:
    """Every command once or more, shuffled, in batches of 1 to 50, from several connections."""
    chooser = random.Random(seed_)
    deliveries = list(commands) + chooser.choices(list(commands), k=len(commands) // 2)
    chooser.shuffle(deliveries)
    shares: list[list[Command]] = [deliveries[i::replicas] for i in range(replicas)]

    async def replica(share: list[Command], number: int) -> None:
        while share:
            size = chooser.randint(1, 50)
            batch, share = share[:size], share[size:]
            async with pool.acquire() as conn:
                await apply_batch(conn, models, batch, f"replica-{number}")

    await asyncio.gather(*(replica(share, n) for n, share in enumerate(shares)))


async def model_differences(stack: Stack, model: type[Projection]) -> list[str]:
    return await differences(stack.write_engine, stack.read_engine, [model])


async def applied(pool: asyncpg.Pool, model: type[Projection]) -> int:
    async with pool.acquire() as conn:
        return await applied_count(conn, model)


async def ledger(pool: asyncpg.Pool, model: type[Projection]) -> tuple[int, int]:
    """The model's watermark and ledger rows."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            f"SELECT (SELECT position FROM {model.watermark()}),"
            f" (SELECT count(*) FROM {model.ledger})"
        )
    assert row is not None
    return int(row[0]), int(row[1])


async def prune_until_still(pruner: LedgerPruner, rounds: int = 10) -> int:
    """Prune rounds (each takes a fence or uses a closed one) until one prunes nothing."""
    total = 0
    for _ in range(rounds):
        pruned = await pruner.prune_round() + await pruner.prune_round()
        total += pruned
        if not pruned:
            return total
    return total


async def test_duplicates_and_shuffling_change_nothing(
    stack: Stack, pool: asyncpg.Pool, model: type[Projection]
) -> None:
    commands = await seed(stack, 600, 25)
    await deliver(pool, [model], commands, seed_=1)
    assert await model_differences(stack, model) == []
    assert await applied(pool, model) == 600
    await deliver(pool, [model], list(reversed(commands)), seed_=2)  # everything again
    assert await model_differences(stack, model) == []
    assert await applied(pool, model) == 600


async def test_a_crash_mid_batch_leaves_no_trace_and_a_restart_converges(
    stack: Stack, pool: asyncpg.Pool, model: type[Projection]
) -> None:
    commands = await seed(stack, 300, 10)
    await deliver(pool, [model], commands[:100], seed_=3)
    # A batch applied in a transaction whose session dies before it commits (kill -9): its
    # own connection, outside the pool, cut by the server; every wait on it bounded.
    victim = await asyncpg.connect(plain_database_url(stack.settings.read_db_url))
    try:
        await victim.execute("BEGIN")
        await apply_batch(victim, [model], commands[100:200], "crashed")
        async with pool.acquire() as other:
            terminated = "SELECT pg_terminate_backend($1, 5000)"
            assert await other.fetchval(terminated, victim.get_server_pid())
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await victim.execute("COMMIT", timeout=5)
    finally:
        victim.terminate()
    assert await applied(pool, model) == 100
    # A new process: a fresh pool, and every command delivered again.
    await pool.expire_connections()
    await deliver(pool, [model], commands, seed_=4)
    assert await model_differences(stack, model) == []
    assert await applied(pool, model) == 300


async def test_pruning_keeps_exactly_once_across_the_boundary(
    stack: Stack, pool: asyncpg.Pool, model: type[Projection]
) -> None:
    """Commands replayed, duplicated and reordered below, at and above the watermark while it
    rises in steps: applied once each, and the ledger ends empty with the watermark at the top."""
    commands = await seed(stack, 2000, 30)
    pruner = LedgerPruner(stack.write_engine, pool, [model], step=256)
    await deliver(pool, [model], commands[:1500], seed_=5)
    assert await prune_until_still(pruner) > 0
    watermark, rows = await ledger(pool, model)
    assert watermark == commands[1499].position and rows == 0
    # Across the boundary: below, at and above the watermark, reversed, with pruning between;
    # after each, the model is the pure function of exactly what was delivered so far.
    boundary = [c for c in commands if abs(c.position - watermark) <= 3]
    seen = {c.position: c for c in commands[:1500]}
    for chunk in (boundary, commands[1400:1800][::-1], commands, boundary):
        await deliver(pool, [model], chunk, seed_=len(chunk))
        await pruner.prune_round()
        seen.update((c.position, c) for c in chunk)
        actual = await actual_model(stack.read_engine, model)
        assert compare(model.name, model.expected(seen.values()), actual) == []
    await prune_until_still(pruner)
    assert await ledger(pool, model) == (commands[-1].position, 0)
    assert await applied(pool, model) == 2000
    await deliver(pool, [model], commands, seed_=6)  # all of it again, all below the watermark
    assert await model_differences(stack, model) == []
    assert await applied(pool, model) == 2000


async def test_the_watermark_never_passes_a_command_that_may_still_commit(
    stack: Stack, pool: asyncpg.Pool, model: type[Projection]
) -> None:
    """A write transaction holds a low id open while later commands commit and are applied:
    the watermark stays below it until it commits, then stops just below it until it is
    applied (so a late delivery is never taken for a duplicate)."""
    early = await seed(stack, 50, 5, "early")
    async with stack.write_engine.connect() as slow:
        await slow.execute(
            text(
                "INSERT INTO commands (key, value, event_type)"
                " VALUES ('late', 'v', 'RecordCreated')"
            )
        )
        late_id = int(await slow.scalar(text("SELECT currval('commands_id_seq')")))
        later = await seed(stack, 50, 5, "later")
        await deliver(pool, [model], early + later, seed_=7)
        pruner = LedgerPruner(stack.write_engine, pool, [model], step=1000)
        await prune_until_still(pruner)
        assert (await ledger(pool, model))[0] < late_id
        await slow.commit()
    await prune_until_still(pruner)
    assert (await ledger(pool, model))[0] == late_id - 1  # stopped at the one not applied
    async with stack.write_engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT id, key, value, event_type, created_at FROM commands WHERE id = :i"),
                {"i": late_id},
            )
        ).one()
    await deliver(pool, [model], [Command(*row)], seed_=8)
    await prune_until_still(pruner)
    assert await ledger(pool, model) == (later[-1].position, 0)
    assert await model_differences(stack, model) == []


async def test_a_rebuild_restores_it_alone(
    stack: Stack, pool: asyncpg.Pool, model: type[Projection]
) -> None:
    """Every model damaged; a rebuild of this one repairs it and leaves the others as they
    were (each model has its own tables, ledger and watermark)."""
    commands = await seed(stack, 500, 20)
    await deliver(pool, MODELS, commands, seed_=9)
    await prune_until_still(LedgerPruner(stack.write_engine, pool, MODELS, step=100))
    async with stack.read_engine.begin() as conn:
        for each in MODELS:
            table = each.tables[0]
            await conn.execute(
                text(f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} LIMIT 3)")
            )
    others = [m for m in MODELS if m is not model]
    damaged = {m.name: await model_differences(stack, m) for m in others}
    assert await model_differences(stack, model) != []
    assert (
        await rebuild(stack.write_engine, stack.read_engine, stack.settings, models=[model]) == 500
    )
    assert await model_differences(stack, model) == []
    # The rebuilt version: its watermark covers the whole snapshot (no writer was open), so
    # no ledger rows.
    assert await ledger(pool, model) == (500, 0)
    for other in others:
        assert await model_differences(stack, other) == damaged[other.name]
    # Projecting on after the swap: duplicates of everything change nothing.
    await deliver(pool, [model], commands, seed_=10)
    assert await model_differences(stack, model) == []
    assert await applied(pool, model) == 500


async def test_verify_finds_a_missing_and_an_unexpected_entry(
    stack: Stack, pool: asyncpg.Pool, model: type[Projection]
) -> None:
    commands = await seed(stack, 40, 4)
    await deliver(pool, [model], commands, seed_=11)
    assert await model_differences(stack, model) == []
    async with stack.write_engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO commands (key, value, event_type)"
                " VALUES ('unseen', 'v', 'RecordCreated')"
            )
        )
    found = await model_differences(stack, model)
    assert found and all(line.startswith(f"{model.name}: missing") for line in found), found
    async with stack.write_engine.begin() as conn:
        await conn.execute(text("DELETE FROM commands WHERE key = 'unseen'"))
        await conn.execute(text("DELETE FROM commands WHERE key = 'k1'"))
    found = await model_differences(stack, model)
    assert found and all(line.startswith(f"{model.name}: unexpected") for line in found), found
