"""A write transaction that runs PREPARE TRANSACTION while a fence waits for it.

The fence (the ledger pruner's, and a rebuild's load: ``projections/ledger.py``) waits for the
transactions writing ``commands`` when it was taken, by their virtual ids. PREPARE passes a
transaction's locks to the prepared transaction (no pid), and after a restart of the server it
is recovered under another virtual id (``-1/<xid>``). Taken as ended, its command (an id at or
below the fence, committed later by COMMIT PREPARED) was below a watermark that had risen past
it: the model never applied it. On a write server of this module's own, with two-phase commit
enabled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from cqrs_stack.config import plain_database_url
from cqrs_stack.localservers import PostgresServer, free_port
from cqrs_stack.projections.ledger import LedgerPruner
from cqrs_stack.projections.records import Records
from tests.fixtures.stack import Stack, wait_until
from tests.integration.test_rebuild import seed
from tests.integration.test_rebuild_watermark import (
    held_write,
    is_held,
    rebuild_held_after_snapshot,
    watermark_logged,
)


@pytest.fixture(scope="module")
def write_pg(server_root: Path) -> Iterator[PostgresServer]:
    """A write server that allows prepared transactions (PostgreSQL's default is none)."""
    server = PostgresServer(
        server_root / "pg-write-2pc", free_port(), password="pg-write-2pc-secret", durable=False
    )
    server.initialise()
    with open(server.data_dir / "postgresql.conf", "a") as conf:
        conf.write("\nmax_prepared_transactions = 4\n")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_writer_prepared_during_the_load_is_not_below_its_watermark(
    stack: Stack,
) -> None:
    """The writer open at the fence PREPAREs once the snapshot is taken: the load waits its
    bound for it and gives every command its ledger row; COMMIT PREPARED after the rebuild
    and the command is applied."""
    await stack.launch("projector")
    write = await asyncpg.connect(plain_database_url(stack.env["WRITE_DB_URL"]))
    held, _ = await held_write(stack, "held")
    try:
        await seed(stack, 5_000, 500)
        async with rebuild_held_after_snapshot(stack) as (process, communicating):
            await held.execute("PREPARE TRANSACTION 'held'")
        _, err = await asyncio.wait_for(communicating, 120)
        assert process.returncode == 0, err.decode()
        assert watermark_logged(err.decode()) == (5_000, 0)
        await write.execute("COMMIT PREPARED 'held'")
    finally:
        for gid in await write.fetch("SELECT gid FROM pg_prepared_xacts"):
            await write.execute(f"ROLLBACK PREPARED '{gid[0]}'")
        await held.close()
        await write.close()
    await wait_until(lambda: is_held(stack), 30, "the held command in the read model")
    await stack.assert_converges()


async def test_the_pruner_waits_for_a_fenced_writer_prepared_across_a_restart(
    stack: Stack, write_pg: PostgresServer
) -> None:
    """The pruner's fence names a writer that PREPAREs, then the write server restarts: the
    prepared transaction is recovered under another virtual id (``-1/<xid>``), so the fence's
    id is gone while the transaction can still commit. The fence must stay open (the
    watermark below the command's id) until COMMIT PREPARED; then the command is applied."""
    await seed(stack, 200, 20)
    projector = await stack.launch("projector")
    await stack.assert_converges()  # the seed applied: the watermark may rise up to it
    projector.kill()  # only this test's pruner from here on
    held, position = await held_write(stack, "held")
    read_pool = await asyncpg.create_pool(plain_database_url(stack.env["READ_DB_URL"]))
    pruner = LedgerPruner(stack.write_engine, read_pool, [Records], step=1000)
    try:
        assert await pruner.prune_round() == 0  # takes the fence: the writer is open
        await held.execute("PREPARE TRANSACTION 'held'")
        await held.close()
        write_pg.stop()
        write_pg.start()
        await stack.write_engine.dispose()  # its pooled connections died with the server
        for _ in range(3):
            await pruner.prune_round()
        mark = await stack.scalar(
            stack.read_engine, "SELECT position FROM applied_commands_watermark"
        )
        assert mark < position
        write = await asyncpg.connect(plain_database_url(stack.env["WRITE_DB_URL"]))
        try:
            await write.execute("COMMIT PREPARED 'held'")
        finally:
            await write.close()
    finally:
        await read_pool.close()
    await stack.launch("projector")
    await wait_until(lambda: is_held(stack), 30, "the held command in the read model")
    await stack.assert_converges()
