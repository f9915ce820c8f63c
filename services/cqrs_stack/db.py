"""Opening the two databases: one way to build an engine, used by every process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ssl import SSLContext

import asyncpg
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .config import Settings, async_database_url, plain_database_url


def create_engine(
    url: str, settings: Settings, *, application_name: str, ssl: SSLContext | bool | None = None
) -> AsyncEngine:
    """Return a pooled async engine on asyncpg for ``url`` (plain postgresql:// accepted).

    ``ssl``: a TLS context for the connections (the operator's, per stack); without it
    asyncpg follows PGSSLMODE/PGSSLROOTCERT, as the stack's pods do.
    """
    tls = {} if ssl is None else {"ssl": ssl}
    return create_async_engine(
        async_database_url(url),
        pool_size=settings.db_pool_min_size,
        max_overflow=max(0, settings.db_pool_max_size - settings.db_pool_min_size),
        # No pre-ping and no ROLLBACK on check-in: each would cost every request a round
        # trip. Transactions end where they begin (engine.begin() commits or rolls back, and
        # closing a connection rolls back what it began); a connection found dead is
        # invalidated where it fails (see driver_connection) and that request answers 503.
        pool_reset_on_return=None,
        pool_recycle=1800,
        connect_args={
            "server_settings": {"application_name": application_name},
            "timeout": 10,
            # A statement stuck behind a lock must not hang a request forever.
            "command_timeout": 30,
            **tls,
        },
    )


def write_engine(settings: Settings, role: str) -> AsyncEngine:
    """Engine on the write DB, named after the process role in pg_stat_activity."""
    return create_engine(settings.write_db_url, settings, application_name=f"cqrs-{role}")


def read_engine(settings: Settings, role: str) -> AsyncEngine:
    """Engine on the read DB, named after the process role in pg_stat_activity."""
    return create_engine(settings.read_db_url, settings, application_name=f"cqrs-{role}")


async def create_pool(
    url: str,
    settings: Settings,
    *,
    application_name: str,
    idle_transaction_timeout: float | None = None,
) -> asyncpg.Pool:
    """An asyncpg pool for the hot paths (reads, group commits, projected batches).

    Measured here: at 64 concurrent readers SQLAlchemy's queue pool serves about 1,300
    checkouts/s while an asyncpg pool serves about 8,000, so the hot paths use their own pool
    and SQLAlchemy keeps the rest (migrations, rebuild, sweeps, figures). It opens connections
    on demand (min_size 0), so a process starts, and reports not ready, while its DB is down.
    With ``idle_transaction_timeout`` (seconds), the server ends a session of the pool left
    idle inside a transaction that long (its process frozen), releasing its locks.
    """
    server_settings = {"application_name": application_name}
    if idle_transaction_timeout is not None:
        timeout_ms = str(round(idle_transaction_timeout * 1000))
        server_settings["idle_in_transaction_session_timeout"] = timeout_ms
    pool = await asyncpg.create_pool(
        plain_database_url(url),
        min_size=0,
        max_size=settings.db_pool_max_size,
        timeout=10,
        command_timeout=30,
        server_settings=server_settings,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


def _discard(conn: asyncpg.Connection) -> None:
    """Close ``conn`` for good instead of returning it to the pool.

    A connection the server closed (restart, ``pg_terminate_backend``) has already been taken
    back by asyncpg's pool, and ``terminate()`` on it raises ``InterfaceError``: that must not
    turn a lost connection, which answers 503, into a 500.
    """
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's RESET ALL round trip on release: the hot paths set no session state
    (an open transaction is still rolled back by asyncpg before this runs)."""


@asynccontextmanager
async def driver_connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """Acquire a hot-path connection; errors come out as SQLAlchemy's, as elsewhere.

    A statement outside an explicit transaction is its own transaction (autocommit). A lost
    connection raises ``OperationalError`` (answered 503), a refused statement ``DBAPIError``.
    """
    try:
        conn = await pool.acquire()
    except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        # No connection to be had (server down, starting or shutting down).
        raise OperationalError("asyncpg", None, exc, connection_invalidated=True) from exc
    try:
        yield conn
    except _CONNECTION_ERRORS as exc:
        _discard(conn)
        raise OperationalError("asyncpg", None, exc, connection_invalidated=True) from exc
    except asyncpg.PostgresError as exc:
        raise DBAPIError("asyncpg", None, exc) from exc  # type: ignore[arg-type]
    except BaseException:
        # Cancelled (a client gone, a timeout) in the middle of a statement: the connection
        # may still be mid-protocol, so it must never go back to the pool.
        _discard(conn)
        raise
    finally:
        await pool.release(conn)


# Errors after which a connection is unusable: dropped from the pool, answered as 503.
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


# A table is counted exactly only while its heap is at most this many bytes per row of the
# bound (25.6 MB at the default 100,000): a count reads every page, and a table that holds a
# few rows in a large file (a ledger pruned from the front after a bulk load or a rebuild,
# which VACUUM cannot shorten) cost 200 ms per count at 10 million rows' worth of pages.
EXACT_COUNT_BYTES_PER_ROW = 256


def row_count_sql(table: str, bound: str = ":exact_max") -> str:
    """A scalar subquery for the rows of ``table``: exact up to ``:exact_max`` rows (and
    ``EXACT_COUNT_BYTES_PER_ROW`` bytes of heap per row of it), else the planner's estimate,
    and whether it is one (two columns, ``n`` and ``estimated``).

    An exact ``count(*)`` reads every page: 10 million rows take seconds, and so do a few
    rows left in the pages of 10 million. The estimate is the planner's own: rows per page at
    the last ANALYZE (or VACUUM) times the table's pages now, so it follows the table's
    growth between analyses. A table never analyzed (no pages recorded) is counted exactly.
    ``table`` is one of our own names, never user input; ``bound`` is the placeholder of the
    bound (SQLAlchemy's ``:exact_max``, asyncpg's ``$1``).
    """
    estimate = (
        "SELECT CASE WHEN c.relpages > 0 AND c.reltuples >= 0 THEN (c.reltuples / c.relpages"
        " * (pg_relation_size(c.oid) / current_setting('block_size')::int))::bigint"
        " ELSE -1 END AS n, pg_relation_size(c.oid) AS bytes"
        f" FROM pg_class c WHERE c.oid = '{table}'::regclass"
    )
    # numeric: a caller's bound may be near bigint's largest (count exactly, whatever the size).
    large = (
        f"e.n >= 0 AND (e.n > {bound}"
        f" OR e.bytes > CAST({bound} AS numeric) * {EXACT_COUNT_BYTES_PER_ROW})"
    )
    return (
        f"SELECT CASE WHEN {large} THEN e.n ELSE (SELECT count(*) FROM {table}) END AS n,"
        f" {large} AS estimated FROM ({estimate}) AS e"
    )


def session_ended(exc: BaseException) -> bool:
    """Did ``exc`` end a database session (its connection closed or cut, its backend
    terminated, the server shutting down), rather than answer one statement?"""
    if isinstance(exc, asyncpg.PostgresError):
        # 08: connection exceptions; 57: operator intervention (pg_terminate_backend, shutdown).
        return str(exc.sqlstate or "")[:2] in ("08", "57")
    # asyncpg's own error for a connection it already knows to be closed has no class of its
    # own: only its message tells it from a misuse of the driver.
    closed = isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)
    return closed or isinstance(exc, ConnectionError)


def quote_ident(name: str) -> str:
    """``name`` quoted as an SQL identifier (a role, column or schema name of any spelling)."""
    return '"' + name.replace('"', '""') + '"'


async def driver_of(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy one (the same session and transaction)."""
    raw = await conn.get_raw_connection()
    return raw.driver_connection  # type: ignore[return-value]
