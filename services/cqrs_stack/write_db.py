"""The write DB: storing commands (the source of truth) and finding unpublished ones."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Sequence

import asyncpg
from sqlalchemy import BigInteger, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .db import driver_connection, row_count_sql
from .errors import RetryLater
from .events import Command

log = logging.getLogger(__name__)

# One statement, hence one round trip and one commit (autocommit) per group of commands. The
# group's token ($4) goes on its first row only: the others share that row's txid.
_INSERT_COMMANDS = """
    INSERT INTO commands (key, value, event_type, batch)
    SELECT k, v, t, CASE WHEN n = 1 THEN $4::uuid END
    FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(k, v, t, n)
    RETURNING id, key, value, event_type, created_at
"""

# The write path marks a group right after its XADD, before answering, so that /stats counts
# what an answer calls published. The commit does not wait for its WAL flush: a mark lost in a
# crash only means the publisher sends those events again (harmless duplicates).
_MARK_PUBLISHED_NOW = """
    WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true))
    UPDATE commands SET published = true FROM async_commit
    WHERE id = ANY($1::bigint[]) AND NOT published
"""

_MARK_PUBLISHED = text(
    "UPDATE commands SET published = true WHERE id = ANY(:ids) AND NOT published"
).bindparams(bindparam("ids", type_=ARRAY(BigInteger)))

# Is the session that sent a group still running (waiting on a lock, or on a dead network)?
# Same application_name only: never end another program's session whose pid was reused.
_SESSION_ALIVE = """
    SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                   WHERE pid = $1 AND application_name = current_setting('application_name'))
"""
_END_SESSION = "SELECT pg_terminate_backend($1)"
_GROUP_COMMANDS = """
    SELECT id, key, value, event_type, created_at FROM commands
    WHERE txid = (SELECT txid FROM commands WHERE batch = $1::uuid) ORDER BY id
"""

# Sizes only: octet_length reads a stored value's length without loading (detoasting) it.
_UNPUBLISHED = text(
    """
    SELECT id, octet_length(key) + octet_length(value) FROM commands
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


class CommitOutcomeUnknown(RetryLater):
    """A group's connection dropped after it was sent and the write DB cannot tell yet whether
    it committed: the answer must say so (503 outcome_unknown), never that the write failed."""

    def __init__(self) -> None:
        super().__init__(
            "outcome_unknown",
            "the connection to the write DB dropped while the write was committing and its "
            "outcome could not be established: it may be stored, and a retry may store it "
            "again (send the same Idempotency-Key, where one was sent)",
        )


def new_batch_token() -> uuid.UUID:
    """A group's token: time-ordered (so its index grows at the right edge) and unique."""
    return uuid.UUID(int=(time.time_ns() // 1_000_000) << 80 | secrets.randbits(80))


async def insert_commands(
    pool: asyncpg.Pool,
    items: Sequence[tuple[str, str, str]],
    token: uuid.UUID,
    outcome_timeout: float,
) -> list[Command]:
    """Store (key, value, event_type) items in one transaction; return them with positions.

    One statement on the asyncpg connection, its own transaction. The result is in the order
    of ``items``: the sequence hands out ids in the order unnest produces rows, so sorting by
    id restores the input order whatever RETURNING does.

    If the connection is lost (or the statement times out) after the statement was sent, the
    group may have committed: it is looked up by ``token`` (see ``find_group``) and, when
    stored, returned as if nothing had happened; when it is known not to be stored the
    original error is raised; when that cannot be known, ``CommitOutcomeUnknown``.
    """
    keys, values, types = (list(column) for column in zip(*items, strict=True))
    session: int | None = None
    try:
        async with driver_connection(pool) as conn:
            session = conn.get_server_pid()
            rows = await conn.fetch(_INSERT_COMMANDS, keys, values, types, token)
    except (DBAPIError, TimeoutError) as exc:  # OperationalError is a DBAPIError
        if session is None or not _may_have_committed(exc):
            raise  # nothing was sent, or the server refused the statement
        stored = await find_group(pool, token, session, outcome_timeout)
        if stored is None:
            raise
        rows = stored
    return sorted((Command(*row) for row in rows), key=lambda c: c.position)


def _may_have_committed(exc: BaseException) -> bool:
    """Could the statement have committed although it raised? Yes for a lost connection, a
    timeout, or the session ended by the server (shutdown, crash, terminated) mid-reply."""
    if isinstance(exc, OperationalError | TimeoutError):
        return True
    orig = getattr(exc, "orig", None)
    return isinstance(orig, asyncpg.OperatorInterventionError)


async def find_group(
    pool: asyncpg.Pool, token: uuid.UUID, session: int, wait_seconds: float
) -> list[asyncpg.Record] | None:
    """Return the commands of the group ``token`` sent on backend ``session``; None if it did
    not commit. Raise ``CommitOutcomeUnknown`` when that is still unknown after ``wait_seconds``.

    The answer is final only once that session has ended (until then its transaction may
    still commit), so a session still running is ended with pg_terminate_backend first.
    """
    deadline = time.monotonic() + wait_seconds
    delay = 0.02
    while True:
        try:
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                async with driver_connection(pool) as conn:
                    if not await conn.fetchval(_SESSION_ALIVE, session):
                        rows = await conn.fetch(_GROUP_COMMANDS, token)
                        log.warning(
                            "commit outcome established stored=%s commands=%d",
                            bool(rows),
                            len(rows),
                        )
                        return rows or None
                    await conn.fetchval(_END_SESSION, session)
        except (DBAPIError, TimeoutError) as exc:  # OperationalError is a DBAPIError
            log.warning("commit outcome not established yet error=%r", exc)
        if time.monotonic() + delay >= deadline:
            raise CommitOutcomeUnknown()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


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
    conn: AsyncConnection, limit: int, max_bytes: int, grace_seconds: float
) -> list[Command]:
    """Lock and return the oldest commands whose event never reached the stream: at most
    ``limit`` of them and ``max_bytes`` of keys and values (at least one, however large).

    Only commands older than ``grace_seconds`` count: younger ones are most likely being
    published by the request that wrote them. SKIP LOCKED lets several write-api replicas
    share the work without publishing the same command twice. Sizes are read first, so a
    page of large values never loads more than ``max_bytes`` of them.
    """
    sizes = await conn.execute(_UNPUBLISHED, {"grace": grace_seconds, "limit": limit})
    page: list[int] = []
    total = 0
    for position, size in sizes:
        total += int(size)
        if page and total > max_bytes:
            break
        page.append(int(position))
    return await commands_on(conn, page) if page else []


async def commands_on(conn: AsyncConnection, positions: Sequence[int]) -> list[Command]:
    """Return the commands with these positions, in position order, as ``conn`` sees them."""
    rows = await conn.execute(_COMMANDS_BY_ID, {"ids": list(positions)})
    return [_command(row) for row in rows]


async def counts(engine: AsyncEngine, exact_max: int) -> dict[str, int | bool]:
    """Return the number of commands (estimated above ``exact_max``, see
    ``db.row_count_sql``), of commands whose event is still unpublished (exact: the partial
    index holds only those), and the last position."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    f"SELECT rows.n, rows.estimated,"
                    " (SELECT count(*) FROM commands WHERE NOT published),"
                    " (SELECT coalesce(max(id), 0) FROM commands)"
                    f" FROM ({row_count_sql('commands')}) AS rows"
                ),
                {"exact_max": exact_max},
            )
        ).one()
    return {
        "commands": int(row[0]),
        "commands_estimated": bool(row[1]),
        "unpublished": int(row[2]),
        "max_position": int(row[3]),
    }
