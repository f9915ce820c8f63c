"""The write DB: storing commands (the source of truth) and finding unpublished ones."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
from sqlalchemy import BigInteger, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .db import driver_connection
from .events import Command

# Marking commands whose events reached the stream; {ids} is the array parameter, spelled as
# the caller's driver wants it (asyncpg: $n, SQLAlchemy: :name).
_MARK_PUBLISHED_SQL = "UPDATE commands SET published = true WHERE id = ANY({ids}) AND NOT published"

# One statement, hence one round trip and one commit (autocommit) per group of commands. It
# also marks the previous groups whose events reached the stream ($4), which saves a commit of
# their own (a data-modifying WITH runs whether or not the INSERT reads it).
_INSERT_COMMANDS = f"""
    WITH marked AS ({_MARK_PUBLISHED_SQL.format(ids="$4::bigint[]")})
    INSERT INTO commands (key, value, event_type)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
    RETURNING id, key, value, event_type, created_at
"""

_MARK_PUBLISHED_NOW = _MARK_PUBLISHED_SQL.format(ids="$1::bigint[]")

_MARK_PUBLISHED = text(_MARK_PUBLISHED_SQL.format(ids=":ids")).bindparams(
    bindparam("ids", type_=ARRAY(BigInteger))
)

_UNPUBLISHED = text(
    """
    SELECT id, key, value, event_type, created_at FROM commands
    WHERE NOT published AND created_at < clock_timestamp() - make_interval(secs => :grace)
    ORDER BY id LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)

_COMMANDS_BY_ID = text(
    "SELECT id, key, value, event_type, created_at FROM commands WHERE id = ANY(:ids) ORDER BY id"
).bindparams(bindparam("ids", type_=ARRAY(BigInteger)))


def _command(row: Sequence[object]) -> Command:
    return Command(*row)  # type: ignore[arg-type]


async def insert_commands(
    pool: asyncpg.Pool,
    items: Sequence[tuple[str, str, str]],
    published: Sequence[int] = (),
) -> list[Command]:
    """Store (key, value, event_type) items in one transaction; return them with positions.

    In the same transaction, mark the commands at ``published`` as published.

    One statement on the asyncpg connection, its own transaction. The result is in the order
    of ``items``: the sequence hands out ids in the order unnest produces rows, so sorting by
    id restores the input order whatever RETURNING does.
    """
    keys, values, types = (list(column) for column in zip(*items, strict=True))
    async with driver_connection(pool) as conn:
        rows = await conn.fetch(_INSERT_COMMANDS, keys, values, types, list(published))
    return sorted((Command(*row) for row in rows), key=lambda c: c.position)


async def mark_published_now(pool: asyncpg.Pool, positions: Sequence[int]) -> None:
    """Record, in a statement of its own, that these commands' events reached the stream."""
    if positions:
        async with driver_connection(pool) as conn:
            await conn.execute(_MARK_PUBLISHED_NOW, list(positions))


async def mark_published(conn: AsyncConnection, positions: Sequence[int]) -> None:
    """Record, in the caller's transaction, that these commands' events reached the stream."""
    if positions:
        await conn.execute(_MARK_PUBLISHED, {"ids": list(positions)})


async def lock_unpublished(
    conn: AsyncConnection, limit: int, grace_seconds: float
) -> list[Command]:
    """Lock and return up to ``limit`` commands whose event never reached the stream.

    Only commands older than ``grace_seconds`` count: younger ones are most likely being
    published by the request that wrote them. SKIP LOCKED lets several write-api replicas
    share the work without publishing the same command twice.
    """
    rows = await conn.execute(_UNPUBLISHED, {"grace": grace_seconds, "limit": limit})
    return [_command(row) for row in rows]


async def commands_on(conn: AsyncConnection, positions: Sequence[int]) -> list[Command]:
    """Return the commands with these positions, in position order, as ``conn`` sees them."""
    rows = await conn.execute(_COMMANDS_BY_ID, {"ids": list(positions)})
    return [_command(row) for row in rows]


async def counts(engine: AsyncEngine) -> dict[str, int]:
    """Return the number of commands and of commands whose event is still unpublished."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM commands),"
                    " (SELECT count(*) FROM commands WHERE NOT published),"
                    " (SELECT coalesce(max(id), 0) FROM commands)"
                )
            )
        ).one()
    return {"commands": int(row[0]), "unpublished": int(row[1]), "max_position": int(row[2])}
