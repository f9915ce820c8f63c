"""Rebuilding the read model from the write DB, the source of truth."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .events import Command
from .projection import apply_commands

CHUNK = 10_000


async def rebuild(
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> int:
    """Replace the read model with the projection of every command; return the command count.

    Runs as one read-DB transaction: readers see the old model until the new one commits, and
    a crash leaves the old one intact. Projectors wait on the table locks meanwhile and then
    skip what the rebuild applied (the ledger is rebuilt too). Read counts are kept.
    """
    async with read_engine.begin() as rconn:
        # Lock before taking the write snapshot: any command a projector applied before the
        # lock committed in the write DB earlier, so the snapshot holds it.
        await rconn.execute(
            text(
                "LOCK TABLE records, applied_commands, projector_consumers IN ACCESS EXCLUSIVE MODE"
            )
        )
        await rconn.execute(
            text(
                "CREATE TEMP TABLE kept_reads ON COMMIT DROP AS"
                " SELECT key, read_count FROM records WHERE read_count > 0"
            )
        )
        await rconn.execute(text("TRUNCATE records, applied_commands, projector_consumers"))
        async with write_engine.connect() as wconn:
            await wconn.execution_options(isolation_level="REPEATABLE READ")
            total = int(await wconn.scalar(text("SELECT count(*) FROM commands")) or 0)
            progress(0, total)
            done = 0
            result = await wconn.stream(
                text("SELECT id, key, value, event_type, created_at FROM commands ORDER BY id")
            )
            async for rows in result.partitions(CHUNK):
                batch = [Command(*row) for row in rows]
                await apply_commands(rconn, batch, "rebuild")
                done += len(batch)
                progress(done, total)
        await rconn.execute(
            text(
                "UPDATE records SET read_count = kept_reads.read_count"
                " FROM kept_reads WHERE records.key = kept_reads.key"
            )
        )
    return done
