"""Idempotent provisioning of a stack's databases, role and stream (and their removal).

Every function can be interrupted anywhere and run again: each step checks before it acts,
and a concurrent duplicate ("already exists") counts as success. Identifiers are validated
against ``spec.IDENTIFIER`` and quoted; the password never reaches a log line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cqrs_stack.config import Settings, redact_url
from cqrs_stack.db import create_engine
from cqrs_stack.migrations import migrate, schema_version
from cqrs_stack.stream import ensure_group, group_info

from .manifests import database_url
from .spec import Database, check_identifier

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
_PASSWORD = re.compile(r"^[A-Za-z0-9_-]{16,200}$")


class ProvisioningError(Exception):
    """A step failed for a reason outside the operator (unreachable server, refused login)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class AdminLogin:
    username: str
    password: str


def quote_ident(name: str) -> str:
    """Quote an identifier already checked by ``check_identifier``."""
    check_identifier(name, "identifier")
    return '"' + name.replace('"', '""') + '"'


def quote_password(password: str) -> str:
    """Quote a generated password (URL-safe alphabet only) as an SQL literal."""
    if not _PASSWORD.match(password):
        raise ValueError("password must be 16..200 URL-safe characters")
    return "'" + password.replace("'", "''") + "'"


async def _admin_connect(db: Database, admin: AdminLogin) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            host=db.host,
            port=db.port,
            user=admin.username,
            password=admin.password,
            database="postgres",
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": "cqrs-stack-operator"},
        )
    except (TimeoutError, OSError) as exc:
        raise ProvisioningError(
            "DatabaseUnreachable", f"cannot reach PostgreSQL at {db.host}:{db.port}: {exc}"
        ) from exc
    except asyncpg.PostgresError as exc:
        raise ProvisioningError(
            "DatabaseLoginFailed",
            f"admin login to {db.host}:{db.port} as {admin.username!r} failed: {exc}",
        ) from exc


async def _ensure_role(conn: asyncpg.Connection, role: str, password: str) -> None:
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    if exists:
        await conn.execute(
            f"ALTER ROLE {quote_ident(role)} WITH LOGIN PASSWORD {quote_password(password)}"
        )
        return
    try:
        await conn.execute(
            f"CREATE ROLE {quote_ident(role)} WITH LOGIN PASSWORD {quote_password(password)}"
        )
        log.info("role created role=%s", role)
    except asyncpg.DuplicateObjectError:
        await conn.execute(
            f"ALTER ROLE {quote_ident(role)} WITH LOGIN PASSWORD {quote_password(password)}"
        )
    is_super = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    if not is_super:  # PostgreSQL 16+: CREATE DATABASE ... OWNER needs membership in the owner
        await conn.execute(f"GRANT {quote_ident(role)} TO CURRENT_USER")


async def _ensure_database(conn: asyncpg.Connection, name: str, owner: str) -> None:
    current = await conn.fetchval(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", name
    )
    if current is None:
        try:
            await conn.execute(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(owner)}")
            log.info("database created database=%s owner=%s", name, owner)
            return
        except asyncpg.DuplicateDatabaseError:
            current = "?"
    if current != owner:
        await conn.execute(f"ALTER DATABASE {quote_ident(name)} OWNER TO {quote_ident(owner)}")


async def ensure_database(db: Database, admin: AdminLogin, role: str, password: str) -> None:
    """Create (or update the password of) ``role`` and the database ``db.name`` it owns."""
    conn = await _admin_connect(db, admin)
    try:
        await _ensure_role(conn, role, password)
        await _ensure_database(conn, db.name, role)
    except asyncpg.PostgresError as exc:
        raise ProvisioningError(
            "DatabaseProvisioningFailed", f"provisioning {db.name} on {db.host}: {exc}"
        ) from exc
    finally:
        await conn.close()


async def migrate_database(db: Database, role: str, password: str, kind: str) -> int:
    """Run the ``kind`` ("write"/"read") migrations as the stack's role; return the version."""
    settings = Settings(db_pool_min_size=1, db_pool_max_size=2)
    url = database_url(db.host, db.port, db.name, role, password)
    engine = create_engine(url, settings, application_name="cqrs-stack-operator")
    try:
        applied = await migrate(engine, kind)
        if applied:
            log.info("migrations applied database=%s count=%d", db.name, len(applied))
        return await schema_version(engine)
    except (TimeoutError, OSError) as exc:
        raise ProvisioningError(
            "DatabaseUnreachable", f"cannot reach PostgreSQL at {db.host}:{db.port}: {exc}"
        ) from exc
    except Exception as exc:  # SQLAlchemy wraps asyncpg errors in many types
        raise ProvisioningError(
            "MigrationFailed", f"migrating {kind} database {db.name}: {_first_line(exc)}"
        ) from exc
    finally:
        await engine.dispose()


async def drop_databases(dbs: list[Database], admin: dict[str, AdminLogin], role: str) -> None:
    """Drop every database of ``dbs`` (forcing connections off), then the role on each server."""
    servers: dict[tuple[str, int], Database] = {}
    for db in dbs:
        conn = await _admin_connect(db, admin[db.name])
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(db.name)} WITH (FORCE)")
            log.info("database dropped database=%s host=%s", db.name, db.host)
        finally:
            await conn.close()
        servers[(db.host, db.port)] = db
    for db in servers.values():
        conn = await _admin_connect(db, admin[db.name])
        try:
            await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
            log.info("role dropped role=%s host=%s", role, db.host)
        finally:
            await conn.close()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _redis(url: str) -> Redis:
    return Redis.from_url(
        url, socket_timeout=CONNECT_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT
    )


async def ensure_stream(url: str, stream: str, group: str) -> bool:
    """Create the stream and its consumer group if missing; True when created now."""
    redis = _redis(url)
    try:
        return await ensure_group(redis, stream, group)
    except (RedisError, OSError) as exc:
        raise ProvisioningError(
            "RedisUnreachable", f"cannot create stream {stream} at {redact_url(url)}: {exc}"
        ) from exc
    finally:
        await redis.aclose()


async def stream_lag(url: str, stream: str, group: str) -> int:
    """Entries of ``stream`` not yet acknowledged by ``group``: pending plus undelivered."""
    redis = _redis(url)
    try:
        info = await group_info(redis, stream, group)
        return int(info["pending"]) + int(info["undelivered"])
    except (RedisError, OSError) as exc:
        raise ProvisioningError(
            "RedisUnreachable", f"cannot read stream {stream} at {redact_url(url)}: {exc}"
        ) from exc
    finally:
        await redis.aclose()


async def delete_stream(url: str, stream: str) -> None:
    """Delete the stream (with its consumer groups) and its dead-letter stream."""
    redis = _redis(url)
    try:
        await redis.delete(stream, f"{stream}:dead")
        log.info("stream deleted stream=%s", stream)
    except (RedisError, OSError) as exc:
        raise ProvisioningError(
            "RedisUnreachable", f"cannot delete stream {stream} at {redact_url(url)}: {exc}"
        ) from exc
    finally:
        await redis.aclose()
