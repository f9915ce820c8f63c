"""Opening the two databases: one way to build an engine, used by every process."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .config import Settings, async_database_url


def create_engine(url: str, settings: Settings, *, application_name: str) -> AsyncEngine:
    """Return a pooled async engine on asyncpg for ``url`` (plain postgresql:// accepted)."""
    return create_async_engine(
        async_database_url(url),
        pool_size=settings.db_pool_min_size,
        max_overflow=max(0, settings.db_pool_max_size - settings.db_pool_min_size),
        pool_pre_ping=True,
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
