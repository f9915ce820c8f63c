"""Versioned, idempotent schema migrations for the write DB and the read DB.

Each database has a folder of ``NNNN_name.sql`` files. ``migrate`` applies those not yet
recorded in ``schema_migrations``, each in its own transaction, under an advisory lock so that
two runners started at once (two operator reconciles, a job and a developer) never race.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

# Arbitrary but fixed: the advisory lock key that serialises migration runners.
_MIGRATION_LOCK_KEY = 7_310_452_001


@dataclass(frozen=True)
class Migration:
    """One schema step: its version number, name and SQL."""

    version: int
    name: str
    sql: str


def load_migrations(database: str) -> list[Migration]:
    """Return the migrations of ``database`` ("write" or "read"), in version order."""
    if database not in ("write", "read"):
        raise ValueError(f"unknown database {database!r}: expected 'write' or 'read'")
    folder = resources.files(__package__).joinpath(database)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    found.sort(key=lambda m: m.version)
    return found


def expected_schema_versions() -> dict[str, int]:
    """The newest migration of each database in this package: the schema this version needs."""
    return {
        kind: max((m.version for m in load_migrations(kind)), default=0)
        for kind in ("write", "read")
    }


async def _applied_versions(conn: AsyncConnection) -> set[int]:
    await conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    )
    rows = await conn.execute(text("SELECT version FROM schema_migrations"))
    return {row[0] for row in rows}


async def migrate(engine: AsyncEngine, database: str) -> list[str]:
    """Apply the pending migrations of ``database``; return the names applied (maybe none)."""
    applied_now: list[str] = []
    for migration in load_migrations(database):
        async with engine.begin() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            if migration.version in await _applied_versions(conn):
                continue
            # exec_driver_sql: a migration file holds several statements.
            raw = await conn.get_raw_connection()
            await raw.driver_connection.execute(migration.sql)  # type: ignore[union-attr]
            await conn.execute(
                text("INSERT INTO schema_migrations (version, name) VALUES (:v, :n)"),
                {"v": migration.version, "n": migration.name},
            )
            applied_now.append(f"{database}/{migration.version:04d}_{migration.name}")
            log.info(
                "migration applied database=%s version=%d name=%s",
                database,
                migration.version,
                migration.name,
            )
    return applied_now


async def schema_version(engine: AsyncEngine) -> int:
    """Return the newest applied migration version of a database, 0 when none."""
    async with engine.connect() as conn:
        exists = await conn.scalar(text("SELECT to_regclass('schema_migrations') IS NOT NULL"))
        if not exists:
            return 0
        return int(
            await conn.scalar(text("SELECT coalesce(max(version), 0) FROM schema_migrations"))
        )
