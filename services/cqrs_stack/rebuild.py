"""Rebuilding the read model from the write DB, the source of truth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

# The read model that the commands define (projection.project), computed set-based in SQL:
# value and updated_at from each key's newest command, created_at from its oldest.
_PROJECT_ALL = """
    WITH per_key AS (
        SELECT key, count(*) AS commands, min(id) AS first_id, max(id) AS last_id
        FROM rebuild_commands GROUP BY key
    )
    INSERT INTO records (key, value, created_at, updated_at, write_count,
                         first_command_id, last_command_id)
    SELECT p.key, newest.value, oldest.created_at, newest.created_at, p.commands,
           p.first_id, p.last_id
    FROM per_key p
    JOIN rebuild_commands oldest ON oldest.id = p.first_id
    JOIN rebuild_commands newest ON newest.id = p.last_id
"""


async def rebuild(
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> int:
    """Replace the read model with the projection of every command; return the command count.

    Runs as one read-DB transaction: readers see the old model until the new one commits, and
    a crash leaves the old one intact. Projectors wait on the table locks meanwhile and then
    skip what the rebuild applied (the ledger is rebuilt too). Read counts are kept.

    The commands are streamed with binary COPY from a write-DB snapshot into a temporary
    table of the read DB, then projected by two set-based statements.
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
        await rconn.execute(
            text(
                "CREATE TEMP TABLE rebuild_commands (id bigint, key text, value text,"
                " created_at timestamptz) ON COMMIT DROP"
            )
        )
        async with write_engine.connect() as wconn:
            await wconn.execution_options(isolation_level="REPEATABLE READ")
            total = int(await wconn.scalar(text("SELECT count(*) FROM commands")) or 0)
            progress(0, total)
            await _copy_commands(wconn, rconn)
            await wconn.rollback()
        done = int(
            await rconn.scalar(
                text(
                    "WITH a AS (INSERT INTO applied_commands SELECT id FROM rebuild_commands"
                    " RETURNING 1) SELECT count(*) FROM a"
                )
            )
            or 0
        )
        await rconn.execute(text(_PROJECT_ALL))
        await rconn.execute(
            text(
                "INSERT INTO projector_consumers (consumer, events_projected, last_position,"
                " last_event_at) SELECT 'rebuild', count(*), coalesce(max(id), 0),"
                " max(created_at) FROM rebuild_commands"
            )
        )
        await rconn.execute(
            text(
                "UPDATE records SET read_count = kept_reads.read_count"
                " FROM kept_reads WHERE records.key = kept_reads.key"
            )
        )
        progress(done, total)
    return done


async def _copy_commands(wconn: AsyncConnection, rconn: AsyncConnection) -> None:
    """Pipe the write snapshot's commands into ``rebuild_commands`` (COPY out → COPY in)."""
    source: asyncpg.Connection = (await wconn.get_raw_connection()).driver_connection  # type: ignore[assignment]
    target: asyncpg.Connection = (await rconn.get_raw_connection()).driver_connection  # type: ignore[assignment]
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

    async def collect(chunk: bytes) -> None:
        await chunks.put(bytes(chunk))

    async def produce() -> None:
        try:
            await source.copy_from_query(
                "SELECT id, key, value, created_at FROM commands", output=collect, format="binary"
            )
        finally:
            await chunks.put(None)

    async def feed() -> AsyncIterator[bytes]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    await asyncio.gather(
        produce(), target.copy_to_table("rebuild_commands", source=feed(), format="binary")
    )
