"""The write DB: storing commands (the source of truth) and finding unpublished ones."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from sqlalchemy import BigInteger, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .db import driver_connection, row_count_sql
from .errors import IdempotencyKeyReused, PreconditionFailed, RequestRefused, RetryLater
from .events import Command

log = logging.getLogger(__name__)

# One statement, hence one round trip and one commit (autocommit) per group of commands.
# No writer ever waits on a lock another session holds: each key of the group is first taken
# with pg_try_advisory_xact_lock (class _KEY_LOCK), which never waits, and a key another
# transaction holds (a writer frozen mid-transaction) is left out of the group (``BUSY``:
# the write path tries it again). Every writer of a key takes that lock before touching the
# key's rows, so the row locks below are never contended. The group's token ($4) goes on its
# first stored row only: the others share that row's txid. Each key's version row (its number
# of commands) is incremented first; the count(*) over those increments is an initplan, run
# once before the first command is produced, so every lock is taken before any command gets
# its id: per key, positions grow in the order of versions. ORDER BY n: ids in input order.
_INSERT_COMMANDS = """
    WITH free AS MATERIALIZED (
        SELECT k FROM (SELECT DISTINCT k FROM unnest($1::text[]) AS u(k)) AS d
        WHERE pg_try_advisory_xact_lock(1, hashtext(k))
    ), todo AS MATERIALIZED (
        SELECT k, v, t, n
        FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(k, v, t, n)
        WHERE k IN (SELECT k FROM free)
    ), counted AS (
        INSERT INTO key_versions AS kv (key, version)
        SELECT k, count(*) FROM todo GROUP BY k ORDER BY k
        ON CONFLICT (key) DO UPDATE SET version = kv.version + excluded.version
        RETURNING kv.key
    )
    INSERT INTO commands (key, value, event_type, batch)
    SELECT k, v, t, CASE WHEN n = (SELECT min(n) FROM todo) THEN $4::uuid END
    FROM todo
    WHERE (SELECT count(*) FROM counted) > 0
    ORDER BY n
    RETURNING id, key, value, event_type, created_at
"""
# The same try-locks for a keyed group's transaction, taken first: the record keys (class 1)
# and the idempotency keys (class 2) another transaction holds. Collisions of the 32-bit hash
# only make a write wait its turn.
_TRY_LOCK_KEYS = """
    SELECT array(SELECT k FROM unnest($1::text[]) AS u(k)
                 WHERE NOT pg_try_advisory_xact_lock(1, hashtext(k))),
           array(SELECT k FROM unnest($2::text[]) AS u(k)
                 WHERE NOT pg_try_advisory_xact_lock(2, hashtext(k)))
"""

# Writes with an Idempotency-Key or a precondition run in a transaction of a few statements
# (writes without them never do). Its row locks are taken only on keys whose try-lock it
# holds (_TRY_LOCK_KEYS), so they never wait on another writer.
# Claim the keys not yet used, each kept until now + the retention of the process storing it.
_CLAIM_KEYS = """
    INSERT INTO idempotency_keys (key, digest, expires_at)
    SELECT k, d, clock_timestamp() + make_interval(secs => $3)
    FROM unnest($1::text[], $2::bytea[]) AS u(k, d) ORDER BY k
    ON CONFLICT (key) DO NOTHING
    RETURNING key
"""
# The keys claimed before (committed: the claim above waited), with their command.
_CLAIMED_BEFORE = """
    SELECT i.key, i.digest, i.event_id, i.version,
           c.id, c.key, c.value, c.event_type, c.created_at
    FROM idempotency_keys AS i JOIN commands AS c ON c.id = i.command_id
    WHERE i.key = ANY($1::text[])
"""
# The versions of the group's keys (a key without a row is at 0). The group holds each
# key's try-lock, so no other writer changes or creates these rows until it ends; nothing is
# written here, so a refused write leaves no row behind.
_LOCK_VERSIONS = "SELECT key, version FROM key_versions WHERE key = ANY($1::text[]) FOR UPDATE"
# The group's keys' versions after it, in its transaction (whose locks hold them).
_VERSIONS = "SELECT key, version FROM key_versions WHERE key = ANY($1::text[])"
_RECORD_CLAIMS = """
    UPDATE idempotency_keys AS i SET command_id = u.id, version = u.version
    FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(key, id, version)
    WHERE i.key = u.key
"""
# A claim whose write was refused (its precondition failed) stores nothing: it is given back.
_RELEASE_CLAIMS = "DELETE FROM idempotency_keys WHERE key = ANY($1::text[])"
# The write path's answers, so that a replay answers as the original did: its stream id, or
# '' when it answered queued. NULL: not answered yet (or the process died before recording).
_RECORD_EVENT_IDS = """
    UPDATE idempotency_keys AS i SET event_id = u.event_id
    FROM unnest($1::text[], $2::text[]) AS u(key, event_id)
    WHERE i.key = u.key
"""
# Expiry: one small batch of the keys past their own expiry time (set at claim by the
# process that stored them), each batch its own short transaction; SKIP LOCKED never waits
# on a key a write holds.
_EXPIRE_KEYS = """
    DELETE FROM idempotency_keys WHERE key IN (
        SELECT key FROM idempotency_keys
        WHERE expires_at < clock_timestamp()
        ORDER BY expires_at LIMIT $1
        FOR UPDATE SKIP LOCKED)
"""
# A claim that vanished between the claim and the look-up (expired in between) is claimed
# again, at most this many times.
_CLAIM_TRIES = 3

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


@dataclass(frozen=True, slots=True)
class Precondition:
    """What a conditional write requires of its key's version (its number of commands).

    ``If-Match: "<n>"`` is version n, ``If-None-Match: *`` version 0, ``If-Match: *`` None
    (any version but 0: the key has a command).
    """

    header: str
    version: int | None

    def holds(self, current: int) -> bool:
        """Does the key's ``current`` version satisfy it?"""
        return current >= 1 if self.version is None else current == self.version


@dataclass(frozen=True, slots=True)
class NewCommand:
    """A command to store, with the write's Idempotency-Key (and its digest) and precondition."""

    key: str
    value: str
    event_type: str
    idempotency_key: str | None = None
    digest: bytes = b""
    precondition: Precondition | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored command and its key's version after it (None: not known, see below).

    ``replayed``: stored by an earlier write with the same Idempotency-Key; ``event_id`` is
    then that write's stream id (None: it was answered queued). The version is known for
    writes with an Idempotency-Key or a precondition only: a plain group's statement returns
    no versions (they would cost it a look-up), nor does a group recovered after a lost
    connection (``find_group``).
    """

    command: Command
    version: int | None
    replayed: bool = False
    event_id: str | None = None
    # False: a replay whose original answer is not recorded yet (see ``original_event_id``).
    settled: bool = True


@dataclass(frozen=True, slots=True)
class Busy:
    """A write left out of its group: another transaction holds its key (or its
    Idempotency-Key), e.g. a writer frozen mid-transaction. Nothing stored; try it again."""


BUSY = Busy()

Outcome = Stored | RequestRefused | Busy


async def insert_commands(
    pool: asyncpg.Pool,
    items: Sequence[tuple[str, str, str]],
    token: uuid.UUID,
    outcome_timeout: float,
) -> list[Outcome]:
    """Store (key, value, event_type) items in one transaction; return them with positions,
    or ``BUSY`` for those whose key another transaction holds (not stored).

    One statement on the asyncpg connection, its own transaction. The result is in the order
    of ``items``: the ids are handed out in input order, so sorting by id restores it
    whatever RETURNING does.

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
    return _in_input_order(keys, rows)


def _in_input_order(keys: Sequence[str], rows: Sequence[Sequence[object]]) -> list[Outcome]:
    """Each item's stored command, ``BUSY`` for a key left out (all of a key's items are
    stored or none is)."""
    stored = Counter(str(row[1]) for row in rows)
    wanted = Counter(key for key in keys if key in stored)
    if stored != wanted:  # a key's rows are all stored or none is: anything else is a bug
        raise WriteAnswerMismatch(
            f"the write DB returned {len(rows)} rows for {sum(wanted.values())} writes"
        )
    commands = iter(_in_order(rows))
    # A key left out is one another transaction holds (or, indistinguishably, a row a
    # trigger dropped): nothing of it is stored, and it is retried, then answered key_busy.
    return [Stored(next(commands), None) if key in stored else BUSY for key in keys]


class WriteAnswerMismatch(RuntimeError):
    """The INSERT's rows do not match the writes sent (never expected; the round fails)."""


def _in_order(rows: Sequence[Sequence[object]]) -> list[Command]:
    return sorted((Command(*row[:5]) for row in rows), key=lambda c: c.position)  # type: ignore[arg-type]


def _with_versions(rows: Sequence[Sequence[object]], after: dict[str, int]) -> list[Stored]:
    """The group's commands in position order, each with its key's version after it.

    ``after`` holds each key's version after the whole group; within the group the key's
    commands took the versions below it in position order.
    """
    commands = _in_order(rows)
    left = Counter(command.key for command in commands)  # the key's commands still to number
    stored = []
    for command in commands:
        left[command.key] -= 1
        stored.append(Stored(command, after[command.key] - left[command.key]))
    return stored


async def store_commands(
    pool: asyncpg.Pool,
    items: Sequence[NewCommand],
    token: uuid.UUID,
    outcome_timeout: float,
    retention: float,
) -> list[Outcome]:
    """Store a group of writes; return each one's outcome, in the order of ``items``.

    A write without Idempotency-Key or precondition is stored as ``insert_commands`` stores
    it (one statement). With them, one transaction: the group's keys and idempotency keys are
    try-locked (a write whose key another transaction holds is ``BUSY``, never waited for);
    its idempotency keys are claimed, kept ``retention`` seconds (a key used before answers
    its original command, ``replayed``, or 422 when the digest differs); then the
    preconditions are checked against the version rows; then the commands are stored and the
    claims record them. Two writes with one Idempotency-Key must not be in one group (the
    caller keeps the first). A lost connection is handled as in ``insert_commands``.
    """
    if all(item.idempotency_key is None and item.precondition is None for item in items):
        plain = [(item.key, item.value, item.event_type) for item in items]
        return await insert_commands(pool, plain, token, outcome_timeout)
    outcomes: dict[int, Outcome] = {}
    to_store: list[int] = []
    session: int | None = None
    try:
        async with driver_connection(pool) as conn:
            session = conn.get_server_pid()
            async with conn.transaction():
                await _try_lock(conn, items, outcomes)
                await _settle_claims(conn, items, outcomes, retention)
                await _check_preconditions(conn, items, outcomes)
                to_store = [i for i in range(len(items)) if i not in outcomes]
                released = [
                    key
                    for i, outcome in outcomes.items()
                    if isinstance(outcome, PreconditionFailed)
                    and (key := items[i].idempotency_key) is not None
                ]
                if released:
                    await conn.execute(_RELEASE_CLAIMS, released)
                if to_store:
                    columns = zip(
                        *((items[i].key, items[i].value, items[i].event_type) for i in to_store),
                        strict=True,
                    )
                    keys, values, types = (list(column) for column in columns)
                    rows = await conn.fetch(_INSERT_COMMANDS, keys, values, types, token)
                    after = dict(await conn.fetch(_VERSIONS, sorted(set(keys))))
                    for i, stored in zip(to_store, _with_versions(rows, after), strict=True):
                        outcomes[i] = stored
                    await _record_claims(conn, items, to_store, outcomes)
    except (DBAPIError, TimeoutError) as exc:  # OperationalError is a DBAPIError
        if not to_store or session is None or not _may_have_committed(exc):
            raise
        found = await find_group(pool, token, session, outcome_timeout)
        if found is None:
            raise
        for i, command in zip(to_store, _in_order(found), strict=True):
            outcomes[i] = Stored(command, None)
    return [outcomes[i] for i in range(len(items))]


async def _try_lock(
    conn: asyncpg.Connection, items: Sequence[NewCommand], outcomes: dict[int, Outcome]
) -> None:
    """Take the group's keys and idempotency keys without waiting; a write whose key or
    idempotency key another transaction holds is ``BUSY``."""
    keys = sorted({item.key for item in items})
    idempotency_keys = sorted({k for item in items if (k := item.idempotency_key) is not None})
    row = await conn.fetchrow(_TRY_LOCK_KEYS, keys, idempotency_keys)
    assert row is not None
    busy_keys, busy_idempotency_keys = set(row[0]), set(row[1])
    if not busy_keys and not busy_idempotency_keys:
        return
    for i, item in enumerate(items):
        if item.key in busy_keys or item.idempotency_key in busy_idempotency_keys:
            outcomes[i] = BUSY


async def _settle_claims(
    conn: asyncpg.Connection,
    items: Sequence[NewCommand],
    outcomes: dict[int, Outcome],
    retention: float,
) -> None:
    """Claim the group's idempotency keys; a key used before settles its write's outcome."""
    keyed = {
        item.idempotency_key: i
        for i, item in enumerate(items)
        if item.idempotency_key and i not in outcomes
    }
    for _ in range(_CLAIM_TRIES):
        if not keyed:
            return
        digests = [items[i].digest for i in keyed.values()]
        claimed = {row[0] for row in await conn.fetch(_CLAIM_KEYS, list(keyed), digests, retention)}
        for key in claimed:
            del keyed[key]
        if not keyed:
            return
        for row in await conn.fetch(_CLAIMED_BEFORE, list(keyed)):
            i = keyed.pop(row[0])
            if bytes(row[1]) != items[i].digest:
                outcomes[i] = IdempotencyKeyReused()
            else:
                event_id = row[2]
                outcomes[i] = Stored(
                    Command(*row[4:]),
                    row[3],
                    replayed=True,
                    event_id=event_id or None,  # '': answered queued
                    settled=event_id is not None,
                )
        # What is left was removed (expired) between the claim and the look-up: claim again.
    raise RetryLater("idempotency_key_busy", "the Idempotency-Key is being expired; retry")


async def _check_preconditions(
    conn: asyncpg.Connection, items: Sequence[NewCommand], outcomes: dict[int, Outcome]
) -> None:
    """Lock the version rows of the group's keys and refuse the writes whose precondition
    fails, in the group's order (a write that passes counts for the next one of its key)."""
    pending = [i for i in range(len(items)) if i not in outcomes]
    if not any(items[i].precondition is not None for i in pending):
        return
    # Every key of the group is read here, not only the conditional ones, in key order.
    keys = sorted({items[i].key for i in pending})
    versions = {row[0]: int(row[1]) for row in await conn.fetch(_LOCK_VERSIONS, keys)}
    for i in pending:
        item = items[i]
        current = versions.get(item.key, 0)
        if item.precondition is not None and not item.precondition.holds(current):
            outcomes[i] = PreconditionFailed(
                item.precondition.header, item.precondition.version, item.key, current
            )
        else:
            versions[item.key] = current + 1


async def _record_claims(
    conn: asyncpg.Connection,
    items: Sequence[NewCommand],
    stored: Sequence[int],
    outcomes: dict[int, Outcome],
) -> None:
    """Record in each claim of the group the command it stored."""
    keys: list[str] = []
    positions: list[int] = []
    versions: list[int | None] = []
    for i in stored:
        key = items[i].idempotency_key
        outcome = outcomes[i]
        if key is not None and isinstance(outcome, Stored):
            keys.append(key)
            positions.append(outcome.command.position)
            versions.append(outcome.version)
    if keys:
        await conn.execute(_RECORD_CLAIMS, keys, positions, versions)


async def record_event_ids(pool: asyncpg.Pool, keyed: Sequence[tuple[str, str]]) -> None:
    """Record the answers of keyed writes in their idempotency keys' rows: the stream id of
    each command's event, or '' for one answered queued."""
    if keyed:
        keys, event_ids = (list(column) for column in zip(*keyed, strict=True))
        async with driver_connection(pool) as conn:
            await conn.execute(_RECORD_EVENT_IDS, keys, event_ids)


# The original's answer, and whether its write may still be recording it (a young row).
_ORIGINAL_ANSWER = """
    SELECT event_id, created_at > clock_timestamp() - make_interval(secs => $2)
    FROM idempotency_keys WHERE key = $1
"""


async def original_event_id(pool: asyncpg.Pool, key: str, within: float) -> str | None:
    """The event_id the first write with Idempotency-Key ``key`` answered (None: queued).

    A replay can find the key committed before that write's process has published its event
    and recorded its answer (another process, a few milliseconds). So while the key is younger
    than ``within`` seconds and its answer unrecorded, this looks again (bounded by
    ``within``); past that, the original answered queued or its process died before recording
    it, and the answer is queued.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.005
    while True:
        async with driver_connection(pool) as conn:
            row = await conn.fetchrow(_ORIGINAL_ANSWER, key, within)
        if row is None or row[0] is not None or not row[1] or loop.time() >= deadline:
            return (row[0] or None) if row is not None else None
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 2, 0.1)


async def expire_idempotency_keys(pool: asyncpg.Pool, batch: int) -> int:
    """Remove one batch of idempotency keys past their expiry time; return how many."""
    async with driver_connection(pool) as conn:
        status = await conn.execute(_EXPIRE_KEYS, batch)
    return int(status.split()[-1])


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
