"""Opening the two databases: one way to build an engine, used by every process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .config import Settings, async_database_url


def create_engine(url: str, settings: Settings, *, application_name: str) -> AsyncEngine:
    """Return a pooled async engine on asyncpg for ``url`` (plain postgresql:// accepted)."""
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
        },
    )


def write_engine(settings: Settings, role: str) -> AsyncEngine:
    """Engine on the write DB, named after the process role in pg_stat_activity."""
    return create_engine(settings.write_db_url, settings, application_name=f"cqrs-{role}")


def read_engine(settings: Settings, role: str) -> AsyncEngine:
    """Engine on the read DB, named after the process role in pg_stat_activity."""
    return create_engine(settings.read_db_url, settings, application_name=f"cqrs-{role}")


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """Check out a pooled connection and hand over its asyncpg connection (the hot paths).

    asyncpg prepares each statement once per connection and skips SQLAlchemy's per-call work;
    a statement outside an explicit transaction is its own transaction (autocommit). Errors
    are raised as SQLAlchemy's (``OperationalError`` for a lost connection, which is then
    dropped from the pool), so the callers' and the app's error handling stays the same.
    """
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: asyncpg.Connection = raw.driver_connection  # type: ignore[assignment]
        try:
            yield driver
        except _CONNECTION_ERRORS as exc:
            await conn.invalidate()
            raise OperationalError("asyncpg", None, exc, connection_invalidated=True) from exc
        except asyncpg.PostgresError as exc:
            raise DBAPIError("asyncpg", None, exc) from exc  # type: ignore[arg-type]
        except BaseException:
            # Cancelled (a client gone, a timeout) in the middle of a statement: the connection
            # may still be mid-protocol, so it must never go back to the pool.
            await asyncio.shield(conn.invalidate())
            raise


# Errors after which a connection is unusable: dropped from the pool, answered as 503.
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
