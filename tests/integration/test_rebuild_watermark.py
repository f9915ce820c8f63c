"""The load's watermark: the commands of its snapshot need no ledger rows up to the first one a
write-DB transaction open at the snapshot may still add (rebuild._loaded_watermark).

A watermark one too high would hide that transaction's command from the shadow for good: the
catch-up and the projectors take every command at or below it as applied.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from cqrs_stack.config import plain_database_url
from tests.fixtures.stack import Stack, wait_until
from tests.integration.test_rebuild import rebuild_command, run_rebuild, seed

_MARK = re.compile(r"rebuild load: commands=(\d+) watermark=(\d+)")


def watermark_logged(log: str) -> tuple[int, int]:
    """The commands loaded and the watermark a rebuild's log gives (LOG_LEVEL=info)."""
    found = _MARK.search(log)
    assert found, log[-2000:]
    return int(found[1]), int(found[2])


async def held_write(stack: Stack, key: str) -> tuple[asyncpg.Connection, int]:
    """A write-DB transaction that has written one command (unpublished, as a write whose
    process died before publishing) and stays open: its id is drawn, its row not visible."""
    conn = await asyncpg.connect(plain_database_url(stack.env["WRITE_DB_URL"]))
    await conn.execute("BEGIN")
    position = await conn.fetchval(
        "INSERT INTO commands (key, value, event_type) VALUES ($1, 'held', 'RecordCreated')"
        " RETURNING id",
        key,
    )
    return conn, int(position)


async def _value_of(stack: Stack, key: str) -> object:
    return await stack.scalar(stack.read_engine, "SELECT value FROM records WHERE key = :k", k=key)


async def test_a_rebuild_with_no_writer_open_needs_no_ledger_rows(stack: Stack) -> None:
    """Nothing being written: the watermark is the last id, the ledger is left empty."""
    await seed(stack, 5_000, 500)
    done = run_rebuild(stack)
    commands, mark = watermark_logged(done.stderr)
    last = await stack.scalar(stack.write_engine, "SELECT max(id) FROM commands")
    assert (commands, mark) == (5_000, last)
    assert await stack.scalar(stack.read_engine, "SELECT count(*) FROM applied_commands") == 0
    # The applied count (status, /stats) stays exact: the watermark's ``pruned`` counts them.
    mark = "SELECT (position, pruned)::text FROM applied_commands_watermark"
    assert await stack.scalar(stack.read_engine, mark) == f"({last},5000)"
    await stack.launch("projector")
    await stack.assert_converges()


# A trigger that holds the run where it records its load's total (``enter("load", 0, total)``,
# just after its write-DB snapshot is taken) until the test lets go of an advisory lock.
_HOLD_AFTER_SNAPSHOT = """
CREATE FUNCTION test_hold_after_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.phase = 'load' AND NEW.total > 0 AND OLD.total = 0 THEN
        PERFORM pg_advisory_xact_lock_shared(4242);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_hold_after_snapshot BEFORE UPDATE ON rebuild_runs
    FOR EACH ROW EXECUTE FUNCTION test_hold_after_snapshot();
"""


@asynccontextmanager
async def rebuild_held_after_snapshot(
    stack: Stack,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, asyncio.Task[tuple[bytes, bytes]]]]:
    """Start ``cqrs-stack rebuild`` and hold it just after its load's write-DB snapshot is
    taken while the block runs; yields its process and the task that ends with its output."""
    read = await asyncpg.connect(plain_database_url(stack.env["READ_DB_URL"]))
    try:
        await read.execute(_HOLD_AFTER_SNAPSHOT)
        await read.execute("SELECT pg_advisory_lock(4242)")
        args, env = rebuild_command(stack)
        process = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        communicating = asyncio.create_task(process.communicate())

        async def snapshot_taken() -> bool:
            assert process.returncode is None, "the rebuild ended before it was held"
            return bool(
                await read.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND objid = 4242 AND NOT granted"
                )
            )

        await wait_until(snapshot_taken, 30, "the rebuild to take its snapshot")
        yield process, communicating
        await read.execute("SELECT pg_advisory_unlock(4242)")
    finally:
        await read.close()


async def test_a_write_open_across_the_loads_snapshot_is_applied_after_the_swap(
    stack: Stack,
) -> None:
    """A transaction holds a low id while later commands commit; the rebuild's snapshot has
    those and not it; it commits while the rebuild loads. The watermark stops just below its
    id, and its command is in the read model once, after the swap."""
    await stack.launch("projector")
    held, position = await held_write(stack, "held")
    try:
        await seed(stack, 20_000, 2_000)  # ids above the held one, committed
        async with rebuild_held_after_snapshot(stack) as (process, communicating):
            await held.execute("COMMIT")
    finally:
        await held.close()
    _, err = await asyncio.wait_for(communicating, 120)
    assert process.returncode == 0, err.decode()
    assert watermark_logged(err.decode())[1] == position - 1
    await wait_until(lambda: is_held(stack), 30, "the held command in the read model")
    await stack.assert_converges()


async def is_held(stack: Stack) -> bool:
    """Is the held write's command in the read model?"""
    return await _value_of(stack, "held") == "held"


async def test_a_write_open_through_the_load_gives_every_command_its_ledger_row(
    stack: Stack,
) -> None:
    """A transaction still open when the load has waited its bound for it: watermark 0, every
    staged command gets its ledger row, and the command is applied once it commits."""
    await seed(stack, 3_000, 300)
    await stack.launch("projector")
    held, _ = await held_write(stack, "held")
    try:
        done = await asyncio.to_thread(run_rebuild, stack)
        assert watermark_logged(done.stderr) == (3_000, 0)
        assert await stack.scalar(stack.read_engine, "SELECT count(*) FROM applied_commands") >= (
            3_000
        )
        assert await _value_of(stack, "held") is None
        await held.execute("COMMIT")
    finally:
        await held.close()
    await wait_until(lambda: is_held(stack), 30, "the held command in the read model")
    await stack.assert_converges()


async def test_ids_handed_out_in_blocks_give_every_command_its_ledger_row(stack: Stack) -> None:
    """With ``CACHE`` > 1 a session writes, later, ids at or below the sequence's last value
    without holding a lock now: no fence holds. A session keeps a block, the rebuild loads,
    the session writes an id of its block and commits after the rebuild: applied. The
    pruner prunes nothing meanwhile and says why."""
    write = await asyncpg.connect(plain_database_url(stack.env["WRITE_DB_URL"]))
    try:
        await write.execute("ALTER SEQUENCE commands_id_seq CACHE 1000")
        await write.execute(
            "INSERT INTO commands (key, value, event_type) VALUES ('first', 'v', 'RecordCreated')"
        )  # draws one id, keeps the next 999
        await seed(stack, 3_000, 300)  # other sessions: ids above that block
        done = await asyncio.to_thread(run_rebuild, stack)
        assert watermark_logged(done.stderr) == (3_001, 0)
        await write.execute("BEGIN")
        position = await write.fetchval(
            "INSERT INTO commands (key, value, event_type) VALUES ('held', 'held',"
            " 'RecordCreated') RETURNING id"
        )
        last = await stack.scalar(stack.write_engine, "SELECT max(id) FROM commands")
        assert position < last  # an id of the block, below ids already committed
        projector = await stack.launch("projector", LEDGER_PRUNE_INTERVAL="0.2")

        async def warned() -> bool:
            return "ledger pruning is off" in projector.log()

        await wait_until(warned, 30, "the pruner's warning")
        await write.execute("COMMIT")
    finally:
        await write.close()
    await wait_until(lambda: is_held(stack), 30, "the held command in the read model")
    await stack.assert_converges()
