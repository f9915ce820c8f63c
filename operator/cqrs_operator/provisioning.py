"""Idempotent provisioning of a stack's databases, role and stream (and their removal).

Every function can be interrupted anywhere and run again: each step checks before it acts,
and a concurrent duplicate ("already exists") counts as success. Identifiers are validated
against ``spec.IDENTIFIER`` and quoted; the password never reaches a log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cqrs_stack import diagnosis
from cqrs_stack.config import Settings, dead_letter_stream_of, redact_url
from cqrs_stack.db import create_engine
from cqrs_stack.migrations import schema_version
from cqrs_stack.stream import dead_letter_marks_of, ensure_group

from .errors import PermanentProvisioningError, ProvisioningError
from .manifests import database_url
from .ownership import CREATED, Marker, OwnershipRefused, claim, may_drop, parse_marker
from .rotation import Login, check_password, logins
from .spec import RESERVED_STREAM_SUFFIXES, Database, DatabaseTls, check_identifier

Tls = ssl.SSLContext | bool | None

__all__ = ["PermanentProvisioningError", "ProvisioningError"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations


@dataclass(frozen=True)
class AdminLogin(Login):
    may_adopt: bool = False  # the platform's consent (annotation on the admin Secret)


@dataclass(frozen=True)
class Change:
    """One step that changed the world, reported as a Kubernetes Event with ``reason``."""

    reason: str
    message: str
    warning: bool = False  # a failure the stack's owner should see (a Warning Event)


@dataclass(frozen=True)
class Owner:
    """On whose behalf provisioning acts: the stack's UID and whether it may adopt.

    Adoption needs both the stack's ``spec.adopt`` and the platform's consent on the admin
    Secret (``adopt_allowed``): a tenant alone cannot take an unmarked database of the server.
    """

    uid: str
    adopt: bool = False
    legacy: frozenset[str] = frozenset()  # names its status recorded before markers existed
    adopt_allowed: bool = True

    def claim(self, what: str, name: str, marker: Marker | None) -> Marker | None:
        # A name the stack's own status recorded (written only by the operator, before this
        # version marked objects) is this stack's: claim it as adopted, never to be dropped.
        if name in self.legacy:
            return claim(what, marker, self.uid, True)
        if marker is None and self.adopt and not self.adopt_allowed:
            raise OwnershipRefused(
                "AdoptionNotAllowed",
                f"{what} carries no owner marker and the admin Secret does not allow adoption "
                '(annotation cqrs.dev/allow-adopt: "true")',
            )
        return claim(what, marker, self.uid, self.adopt)


def quote_ident(name: str) -> str:
    """Quote an identifier already checked by ``check_identifier``."""
    check_identifier(name, "identifier")
    return '"' + name.replace('"', '""') + '"'


def scram_verifier(password: str, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    ``CREATE/ALTER ROLE ... PASSWORD '<verifier>'`` stores it as is, so the clear-text
    password never travels in SQL text (nor lands in a server log with log_statement=ddl).
    """
    check_password(password)  # ASCII only: SASLprep leaves it unchanged
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def tls_context(tls: DatabaseTls | None, ca_pem: str | None) -> Tls:
    """asyncpg's ``ssl`` for libpq's sslmode ``tls.mode`` (None: asyncpg's default, prefer)."""
    if tls is None:
        return None
    if tls.mode == "disable":
        return False
    context = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    if tls.mode in ("require", "verify-ca"):
        context.check_hostname = False
    if tls.mode == "require":
        context.verify_mode = ssl.CERT_NONE
    return context


async def _connect(
    db: Database, user: str, password: str, database: str, tls: Tls = None
) -> asyncpg.Connection:
    extra = {} if tls is None else {"ssl": tls}
    return await asyncpg.connect(
        **extra,
        host=db.host,
        port=db.port,
        user=user,
        password=password,
        database=database,
        timeout=CONNECT_TIMEOUT,
        server_settings={"application_name": "cqrs-stack-operator"},
    )


async def _admin_connect(db: Database, admin: AdminLogin, tls: Tls = None) -> asyncpg.Connection:
    try:
        return await _connect(db, admin.username, admin.password, "postgres", tls)
    except (TimeoutError, OSError) as exc:
        raise ProvisioningError(
            "DatabaseUnreachable", f"cannot reach PostgreSQL at {db.host}:{db.port}: {exc}"
        ) from exc
    except asyncpg.PostgresError as exc:
        raise ProvisioningError(
            "DatabaseLoginFailed",
            f"admin login to {db.host}:{db.port} as {admin.username!r} failed: {exc}",
        ) from exc


@contextlib.asynccontextmanager
async def _admin_session(
    db: Database, admin: AdminLogin, tls: Tls, doing: str
) -> AsyncIterator[asyncpg.Connection]:
    """An admin connection to ``db``'s server; a PostgreSQL error becomes ours."""
    conn = await _admin_connect(db, admin, tls)
    try:
        yield conn
    except asyncpg.PostgresError as exc:
        raise ProvisioningError(
            "DatabaseProvisioningFailed", f"{doing} on {db.host}: {exc}"
        ) from exc
    finally:
        await conn.close()


async def _set_password(conn: asyncpg.Connection, role: str, password: str) -> None:
    verifier = await asyncio.to_thread(scram_verifier, password)
    await conn.execute(f"ALTER ROLE {quote_ident(role)} WITH LOGIN PASSWORD {_literal(verifier)}")


async def _role_marker(conn: asyncpg.Connection, role: str) -> tuple[bool, Marker | None]:
    """Whether ``role`` exists, and its owner marker."""
    row = await conn.fetchrow(
        "SELECT shobj_description(oid, 'pg_authid') AS comment FROM pg_roles WHERE rolname = $1",
        role,
    )
    return row is not None, parse_marker(row["comment"]) if row is not None else None


async def _ensure_role(
    conn: asyncpg.Connection, role: str, password: str | None, owner: Owner, where: str
) -> list[Change]:
    """Create ``role`` marked as this stack's, or check the marker of the existing one.

    ``password`` None: the role is not a login slot now (the pods log in as its member), so
    a new one is created NOLOGIN.
    """
    exists, found = await _role_marker(conn, role)
    what = f"role {role} on {where}"
    if exists:
        wanted = owner.claim(what, role, found)
        if wanted is None:
            return []
        await conn.execute(f"COMMENT ON ROLE {quote_ident(role)} IS {_literal(wanted.text())}")
        if password is not None:
            await _set_password(conn, role, password)
        log.info("role adopted role=%s server=%s", role, where)
        return [Change("RoleAdopted", f"adopted {what} (never dropped by this stack)")]
    login = "NOLOGIN"
    if password is not None:
        verifier = await asyncio.to_thread(scram_verifier, password)
        login = f"LOGIN PASSWORD {_literal(verifier)}"
    marker = Marker(owner.uid, CREATED).text()
    try:
        async with conn.transaction():  # the role and its marker exist together or not at all
            await conn.execute(f"CREATE ROLE {quote_ident(role)} WITH {login}")
            await conn.execute(f"COMMENT ON ROLE {quote_ident(role)} IS {_literal(marker)}")
    except asyncpg.DuplicateObjectError:
        return await _ensure_role(conn, role, password, owner, where)  # a concurrent create
    is_super = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    if not is_super:  # PostgreSQL 16+: CREATE DATABASE ... OWNER needs membership in the owner
        await conn.execute(f"GRANT {quote_ident(role)} TO CURRENT_USER")
    log.info("role created role=%s server=%s", role, where)
    return [Change("RoleCreated", f"created {what}")]


async def _database_marker(conn: asyncpg.Connection, name: str) -> tuple[bool, Marker | None, str]:
    row = await conn.fetchrow(
        "SELECT shobj_description(oid, 'pg_database') AS comment, "
        "pg_get_userbyid(datdba) AS owner FROM pg_database WHERE datname = $1",
        name,
    )
    if row is None:
        return False, None, ""
    return True, parse_marker(row["comment"]), row["owner"]


async def _ensure_database(
    conn: asyncpg.Connection, name: str, role: str, owner: Owner, where: str
) -> list[Change]:
    exists, marker, db_owner = await _database_marker(conn, name)
    what = f"database {name} on {where}"
    created = Marker(owner.uid, CREATED).text()
    if not exists:
        try:
            await conn.execute(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(role)}")
        except asyncpg.DuplicateDatabaseError:
            return await _ensure_database(conn, name, role, owner, where)
        # CREATE DATABASE cannot share a transaction with COMMENT: a crash between the two
        # leaves an unmarked database owned by this stack's role, claimed as created below.
        await conn.execute(f"COMMENT ON DATABASE {quote_ident(name)} IS {_literal(created)}")
        log.info("database created database=%s owner=%s server=%s", name, role, where)
        return [Change("DatabaseCreated", f"created {what} owned by {role}")]
    if marker is None and db_owner == role:
        _, role_marker = await _role_marker(conn, role)
        if role_marker == Marker(owner.uid, CREATED):
            await conn.execute(f"COMMENT ON DATABASE {quote_ident(name)} IS {_literal(created)}")
            return []
    wanted = owner.claim(what, name, marker)
    changes: list[Change] = []
    if wanted is not None:
        await conn.execute(f"COMMENT ON DATABASE {quote_ident(name)} IS {_literal(wanted.text())}")
        log.info("database adopted database=%s server=%s", name, where)
        changes.append(Change("DatabaseAdopted", f"adopted {what} (never dropped by this stack)"))
    if db_owner != role:  # an adopted database: the stack's role runs its migrations
        await conn.execute(f"ALTER DATABASE {quote_ident(name)} OWNER TO {quote_ident(role)}")
    return changes


async def _ensure_member_login(
    conn: asyncpg.Connection, login: Login, role: str, owner: Owner, where: str
) -> list[Change]:
    """The second login slot: a role marked as this stack's, member of ``role``, whose
    sessions run as ``role`` (so what its migrations create is owned by ``role``)."""
    name = login.username
    exists, found = await _role_marker(conn, name)
    what = f"role {name} on {where}"
    if exists:
        claim(what, found, owner.uid, False)  # never adopted: it is always this stack's own
    else:
        verifier = await asyncio.to_thread(scram_verifier, login.password)
        marker = Marker(owner.uid, CREATED).text()
        try:
            async with conn.transaction():
                await conn.execute(
                    f"CREATE ROLE {quote_ident(name)} WITH LOGIN PASSWORD {_literal(verifier)}"
                )
                await conn.execute(f"COMMENT ON ROLE {quote_ident(name)} IS {_literal(marker)}")
        except asyncpg.DuplicateObjectError:
            return await _ensure_member_login(conn, login, role, owner, where)
        log.info("role created role=%s server=%s", name, where)
    member = await conn.fetchval(
        "SELECT 1 FROM pg_auth_members WHERE roleid = $1::regrole AND member = $2::regrole",
        role,
        name,
    )
    setting = f"role={role}"
    configured = await conn.fetchval(
        "SELECT $2 = ANY(setconfig) FROM pg_db_role_setting "
        "WHERE setrole = $1::regrole AND setdatabase = 0",
        name,
        setting,
    )
    if not member:
        await conn.execute(f"GRANT {quote_ident(role)} TO {quote_ident(name)}")
    if not configured:
        await conn.execute(f"ALTER ROLE {quote_ident(name)} SET role = {_literal(role)}")
    return [] if exists else [Change("RoleCreated", f"created {what}, a login of role {role}")]


async def _revoke_other_logins(
    conn: asyncpg.Connection, role: str, keep: set[str], uid: str, where: str
) -> list[Change]:
    """The login slots of ``role`` not in ``keep`` may not log in: no password, NOLOGIN,
    their sessions ended. Only slots marked with this stack's UID are touched."""
    changes: list[Change] = []
    for name in logins(role):
        _, found = await _role_marker(conn, name)
        if name in keep or found is None or found.uid != uid:
            continue
        can_login = await conn.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", name)
        if not can_login:
            continue
        await conn.execute(f"ALTER ROLE {quote_ident(name)} WITH NOLOGIN PASSWORD NULL")
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE usename = $1 AND pid <> pg_backend_pid()",
                name,
            )
        except asyncpg.PostgresError as exc:  # no right to signal: new logins fail anyway
            log.warning("sessions of revoked role %s on %s not ended: %s", name, where, exc)
        log.info("role login revoked role=%s server=%s", name, where)
        changes.append(Change("CredentialsRevoked", f"revoked the login of role {name} on {where}"))
    return changes


async def ensure_database(
    db: Database,
    admin: AdminLogin,
    role: str,
    accepted: list[Login],
    owner: Owner,
    tls: Tls = None,
    exact: bool = True,
) -> list[Change]:
    """Create ``role`` and the database ``db.name`` it owns, or check they are this stack's;
    then make sure each ``accepted`` login logs in with its password (set as a SCRAM verifier
    if not). ``exact`` (no rotation under way): the stack's other login slot is revoked."""
    where = f"{db.host}:{db.port}"
    async with _admin_session(db, admin, tls, f"provisioning {db.name}") as conn:
        own = next((login.password for login in accepted if login.username == role), None)
        changes = await _ensure_role(conn, role, own, owner, where)
        for login in accepted:
            if login.username != role:
                changes += await _ensure_member_login(conn, login, role, owner, where)
        changes += await _ensure_database(conn, db.name, role, owner, where)
        for login in accepted:
            if not await role_logs_in(db, login.username, login.password, tls):
                await _set_password(conn, login.username, login.password)
                changes.append(
                    Change("RolePasswordSet", f"set the password of role {login.username}")
                )
                log.info("role password set role=%s server=%s", login.username, where)
        if exact:
            keep = {login.username for login in accepted}
            changes += await _revoke_other_logins(conn, role, keep, owner.uid, where)
    return changes


async def revoke_other_logins(
    db: Database, admin: AdminLogin, role: str, keep: Login, uid: str, tls: Tls = None
) -> list[Change]:
    """A rotation's last step on one server: only ``keep`` logs in from now on."""
    async with _admin_session(db, admin, tls, f"revoking logins of {role}") as conn:
        return await _revoke_other_logins(conn, role, {keep.username}, uid, f"{db.host}:{db.port}")


async def role_logs_in(db: Database, role: str, password: str, tls: Tls = None) -> bool:
    """True when ``role`` logs in to ``db`` with ``password``; False when the password (or
    the login) is refused. An unreachable server raises ProvisioningError."""
    try:
        conn = await _connect(db, role, password, db.name, tls)
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        return False
    except (TimeoutError, OSError) as exc:
        raise ProvisioningError(
            "DatabaseUnreachable", f"cannot reach PostgreSQL at {db.host}:{db.port}: {exc}"
        ) from exc
    await conn.close()
    return True


async def read_schema_version(db: Database, role: str, password: str, tls: Tls = None) -> int:
    """The newest migration applied to ``db``, read as the stack's role (0 for none).

    The operator never migrates: the stack's own image does, in the migration Job.
    """
    settings = Settings(db_pool_min_size=1, db_pool_max_size=2)
    url = database_url(db.host, db.port, db.name, role, password)
    engine = create_engine(url, settings, application_name="cqrs-stack-operator", ssl=tls)
    try:
        return await schema_version(engine)
    except (TimeoutError, OSError) as exc:
        raise ProvisioningError(
            "DatabaseUnreachable", f"cannot reach PostgreSQL at {db.host}:{db.port}: {exc}"
        ) from exc
    except Exception as exc:  # SQLAlchemy wraps asyncpg errors in many types
        raise ProvisioningError(
            "SchemaUnreadable", f"reading the schema version of {db.name}: {_first_line(exc)}"
        ) from exc
    finally:
        await engine.dispose()


async def catch_up_health(
    write_db: Database, read_db: Database, role: str, password: str, tls: Tls = None
) -> diagnosis.CatchUpHealth:
    """The catch-up sweep's watermark and the write-DB transactions pinning it
    (cqrs_stack.diagnosis), read as the stack's role: its own sessions are named in full,
    another role's by xid (pg_stat_activity hides the rest of them)."""
    settings = Settings(db_pool_min_size=1, db_pool_max_size=1)
    engines = [
        create_engine(
            database_url(db.host, db.port, db.name, role, password),
            settings,
            application_name="cqrs-stack-operator",
            ssl=tls,
        )
        for db in (write_db, read_db)
    ]
    try:
        return await diagnosis.read_catch_up(*engines)
    finally:
        for engine in engines:
            await engine.dispose()


@contextlib.asynccontextmanager
async def stack_session(
    db: Database, user: str, password: str, tls: Tls = None
) -> AsyncIterator[asyncpg.Connection]:
    """A connection to ``db`` as a login of the stack's role: what the stack's own image
    records there (a rebuild's progress) is read as the stack, never as admin."""
    try:
        conn = await _connect(db, user, password, db.name, tls)
    except (TimeoutError, OSError) as exc:
        raise ProvisioningError(
            "DatabaseUnreachable", f"cannot reach PostgreSQL at {db.host}:{db.port}: {exc}"
        ) from exc
    except asyncpg.PostgresError as exc:
        raise ProvisioningError(
            "DatabaseLoginFailed", f"login to {db.name} as {user!r} failed: {_first_line(exc)}"
        ) from exc
    try:
        yield conn
    finally:
        await conn.close()


async def drop_owned(
    dbs: list[tuple[Database, AdminLogin]], role: str, uid: str, tls: Tls = None
) -> tuple[list[str], list[str]]:
    """Drop the databases of ``dbs`` and the role that this stack created; leave the rest.

    Each database comes with the admin login checked for its own server: two databases of
    the same name on two servers never share a login.
    Returns (dropped, left): what was dropped and what was left behind, each as "kind name".
    """
    dropped: list[str] = []
    left: list[str] = []
    servers: dict[tuple[str, int, str], tuple[Database, AdminLogin]] = {}
    for db, login in dbs:
        conn = await _admin_connect(db, login, tls)
        try:
            exists, marker, _ = await _database_marker(conn, db.name)
            if exists and may_drop(marker, uid):
                await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(db.name)} WITH (FORCE)")
                log.info("database dropped database=%s host=%s", db.name, db.host)
                dropped.append(f"database {db.name}")
            elif exists:
                left.append(f"database {db.name} (not created by this stack)")
        finally:
            await conn.close()
        servers.setdefault((db.host, db.port, login.username), (db, login))
    for db, login in servers.values():
        conn = await _admin_connect(db, login, tls)
        try:
            for name in reversed(logins(role)):  # the member login first, then the owner
                exists, found = await _role_marker(conn, name)
                if not exists:
                    continue
                if not may_drop(found, uid):
                    left.append(f"role {name} on {db.host} (not created by this stack)")
                    continue
                try:
                    await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(name)}")
                    dropped.append(f"role {name} on {db.host}")
                    log.info("role dropped role=%s host=%s", name, db.host)
                except asyncpg.DependentObjectsStillExistError:
                    left.append(f"role {name} on {db.host} (still owns objects)")
        finally:
            await conn.close()
    return dropped, left


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _redis(url: str, ca_pem: str | None = None, admin: AdminLogin | None = None) -> Redis:
    """A short-lived client; ``ca_pem`` verifies a rediss:// server against that CA;
    ``admin`` logs in with the admin Secret's login instead of the URL's."""
    extra: dict[str, Any] = {} if ca_pem is None else {"ssl_ca_data": ca_pem}
    if admin is not None:
        extra.update(username=admin.username or "default", password=admin.password)
    return Redis.from_url(
        url, socket_timeout=CONNECT_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT, **extra
    )


# What the services send to Redis (cqrs_stack.stream, the health checks and diagnosis: XRANGE
# reads the first undelivered and the oldest dead entry), nothing more.
# MULTI/EXEC: redis-py's transactional pipelines. No SELECT: key patterns hold in every
# logical database, so an isolated stack stays in database 0 (reconcile.check_isolated_database).
# No EVAL: a script runs to completion on the shared server (a loop blocks every stack's
# Redis until someone runs SCRIPT KILL), so isolated stacks publish with pipelined XADDs.
REDIS_COMMANDS = (
    "ping",
    "multi",
    "exec",
    "discard",
    "xadd",
    "xack",
    "xclaim",
    "xgroup",
    "xinfo",
    "xlen",
    "xpending",
    "xreadgroup",
    # The projector's diagnosis (the oldest entry's age) and cqrs-stack dlq (and kubectl cqrs
    # dlq, with the pods' login): read, age and remove dead letters.
    "xrange",
    "xrevrange",
    "xdel",
    "time",
    # Dead letters once per command (stream.dead_letter_once: WATCH, no script) and their
    # position marks.
    "watch",
    "unwatch",
    "hexists",
    "hset",
    "hdel",
)


def password_hash(password: str) -> str:
    """The SHA-256 hex Redis stores for a password (``#<hex>`` in ACL SETUSER)."""
    return hashlib.sha256(check_password(password).encode()).hexdigest()


def acl_rules(stream: str, passwords: list[str], existing: set[str], exact: bool) -> list[str]:
    """ACL SETUSER rules: the stack's stream and dead-letter stream, the services' commands,
    and the passwords (as their SHA-256, ``#<hex>``: the clear text is not in the command).

    Keys and commands are reset to exactly these each time; passwords are not: ``exact``
    (no rotation under way) leaves only ``passwords``, else the missing ones are added and
    those already there are kept (the pods not yet rolled out log in with them). The owner
    key ``<stream>:owner`` is outside the user's keys: pods cannot rewrite it.
    """
    wanted = [password_hash(p) for p in passwords]
    if exact and existing != set(wanted):
        secrets_rules = ["resetpass", *(f"#{h}" for h in wanted)]
    else:
        secrets_rules = [f"#{h}" for h in wanted if h not in existing]
    return [
        "on",
        *secrets_rules,
        "resetkeys",
        f"~{stream}",
        f"~{dead_letter_stream_of(stream)}",
        f"~{dead_letter_marks_of(stream)}",
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in REDIS_COMMANDS),
    ]


async def ensure_acl_user(
    url: str,
    admin: AdminLogin,
    user: str,
    stream: str,
    passwords: list[str],
    ca_pem: str | None = None,
    exact: bool = True,
) -> list[Change]:
    """Create the stack's ACL user or bring its keys, commands and passwords to the wanted
    ones (see ``acl_rules``); a Change when it is new or loses a password."""
    redis = _redis(url, ca_pem, admin)
    try:
        found: dict[str, Any] | None = await redis.acl_getuser(user)
        existing = {str(h) for h in (found or {}).get("passwords") or []}
        flags = {str(f) for f in (found or {}).get("flags") or []}
        if "nopass" in flags:
            existing.add("nopass")  # never equal to the wanted set: resetpass clears it
        rules = acl_rules(stream, passwords, existing, exact)
        await redis.execute_command("ACL", "SETUSER", user, *rules)
    except (RedisError, OSError) as exc:
        raise ProvisioningError(
            "RedisAclFailed", f"cannot set ACL user {user} at {redact_url(url)}: {_first_line(exc)}"
        ) from exc
    finally:
        await redis.aclose()
    if found is None:
        log.info("redis acl user created user=%s", user)
        return [Change("AclUserCreated", f"created Redis ACL user {user} limited to {stream}")]
    if "resetpass" in rules and existing - {password_hash(p) for p in passwords}:
        log.info("redis acl user passwords revoked user=%s", user)
        return [
            Change("CredentialsRevoked", f"Redis ACL user {user} accepts only the new password")
        ]
    return []


async def delete_acl_user(
    url: str, admin: AdminLogin, user: str, ca_pem: str | None = None
) -> bool:
    redis = _redis(url, ca_pem, admin)
    try:
        return bool(await redis.acl_deluser(user))
    except (RedisError, OSError) as exc:
        raise ProvisioningError(
            "RedisAclFailed", f"cannot delete ACL user {user} at {redact_url(url)}: {exc}"
        ) from exc
    finally:
        await redis.aclose()


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with its user and password replaced by the stack's ACL user's."""
    # The host as every URL parser reads it (urlsplit, redis-py): the netloc after its last
    # "@", never a "@" of the path, query or fragment (a host checked against admin-hosts
    # must be the host the login is sent to).
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    login = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=login, fragment=""))


async def _check_related_keys(redis: Redis, stream: str, owner: Owner) -> None:
    """Refuse a stream named after another stack's keys (``<its stream>:dead``, ``:owner``):
    its dead letters are that stack's data, and its owner key is never a stream."""
    parts = stream.split(":")
    for cut in range(1, len(parts)):
        base = ":".join(parts[:cut])
        marker = parse_marker(await redis.get(owner_key(base)))
        if marker is not None and marker.uid != owner.uid:
            raise OwnershipRefused(
                "OwnedByAnotherStack",
                f"stream {stream} is a key of stream {base}, which belongs to another CqrsStack",
            )
    # The other way round: a stack that took "<stream>:dead" as its own stream (before the
    # suffix was reserved) holds this stream's dead letters.
    dead = dead_letter_stream_of(stream)
    marker = parse_marker(await redis.get(owner_key(dead)))
    if marker is not None and marker.uid != owner.uid:
        raise OwnershipRefused(
            "OwnedByAnotherStack",
            f"the dead-letter stream {dead} of stream {stream} belongs to another CqrsStack",
        )


def owner_key(stream: str) -> str:
    """The key next to ``stream`` that holds its owner marker."""
    return f"{stream}:owner"


async def ensure_stream(
    url: str, stream: str, group: str, owner: Owner, ca_pem: str | None = None
) -> list[Change]:
    """Create the stream (marked as this stack's) and its consumer group if missing.

    An existing stream without an owner key is adopted only when ``owner`` may adopt it.
    """
    redis = _redis(url, ca_pem)
    what = f"stream {stream}"
    changes: list[Change] = []
    try:
        if stream.endswith(RESERVED_STREAM_SUFFIXES):
            raise OwnershipRefused(
                "ReservedName", f"{what}: the suffixes {RESERVED_STREAM_SUFFIXES} are reserved"
            )
        await _check_related_keys(redis, stream, owner)
        marker = parse_marker(await redis.get(owner_key(stream)))
        if marker is None:
            existed = bool(await redis.exists(stream))
            wanted = owner.claim(what, stream, None) if existed else Marker(owner.uid, CREATED)
            assert wanted is not None
            if await redis.set(owner_key(stream), wanted.text(), nx=True):
                changes.append(
                    Change("StreamAdopted", f"adopted {what} (never deleted by this stack)")
                    if existed
                    else Change("StreamCreated", f"created {what}")
                )
            marker = parse_marker(await redis.get(owner_key(stream)))
        owner.claim(what, stream, marker)
        if await ensure_group(redis, stream, group):
            changes.append(Change("ConsumerGroupCreated", f"created group {group} on {what}"))
        return changes
    except (RedisError, OSError) as exc:
        raise ProvisioningError(
            "RedisUnreachable", f"cannot create stream {stream} at {redact_url(url)}: {exc}"
        ) from exc
    finally:
        await redis.aclose()


async def stream_health(
    url: str, stream: str, group: str, stopped_after: float, ca_pem: str | None = None
) -> diagnosis.StreamHealth:
    """The consumer group's health (cqrs_stack.diagnosis): its lag (pending plus
    undelivered), consumers (stopped: idle past ``stopped_after`` holding entries) and
    oldest pending entry."""
    redis = _redis(url, ca_pem)
    try:
        found = await diagnosis.read_stream(redis, stream, group, stopped_after, CONNECT_TIMEOUT)
    finally:
        await redis.aclose()
    if not found.reachable:
        raise ProvisioningError(
            "RedisUnreachable", f"cannot read stream {stream} at {redact_url(url)}: {found.error}"
        )
    return found


async def delete_owned_stream(
    url: str, stream: str, uid: str, ca_pem: str | None = None
) -> bool | None:
    """Delete the stream, its dead letters (stream and marks) and owner key if this stack
    created them; True when deleted, False when left (adopted, another stack's, unmarked),
    None when there is neither stream nor owner key (an earlier teardown deleted them)."""
    redis = _redis(url, ca_pem)
    try:
        marker = parse_marker(await redis.get(owner_key(stream)))
        if marker is None and not await redis.exists(stream):
            return None
        if not may_drop(marker, uid):
            return False
        await redis.delete(
            stream, dead_letter_stream_of(stream), dead_letter_marks_of(stream), owner_key(stream)
        )
        log.info("stream deleted stream=%s", stream)
        return True
    except (RedisError, OSError) as exc:
        raise ProvisioningError(
            "RedisUnreachable", f"cannot delete stream {stream} at {redact_url(url)}: {exc}"
        ) from exc
    finally:
        await redis.aclose()
