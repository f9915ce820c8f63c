"""Rebuilding read models from the write DB, beside the live ones, then swapping them in.

A version of a read model is its tables (``Projection.version_tables``: model, ledger,
watermark); the version in the live schema serves reads and is projected into throughout. A
rebuild of one model or several:

1. **loads** a new version into the schema ``SHADOW_SCHEMA``: the commands of one write-DB
   snapshot, by binary COPY piped with a bounded number of bytes in memory, into a staging
   table there, then each model's own ``effect`` (the statement the projectors run) over all
   of them at once, and a ledger row for each;
2. **catches up**: applies to the shadow, through the same set-based projection as the
   projectors (``apply_batch``, the shadow first on the ``search_path``), every command
   whose ledger row the live version has and the shadow lacks, in pages bounded by count and
   bytes, outside any lock, until what is left is small. Only a command the snapshot did not
   see can be one, so they are found through the write DB's txid index: the cost follows the
   writes made during the rebuild, not the size of the model. Each page also copies the live
   read counts of its keys (``Projection.carried``: a key first written during the load had no
   shadow row when every read count was copied);
3. **swaps** in one transaction: EXCLUSIVE locks on the live tables (projectors and read-count
   flushes wait, readers do not), the last remainder applied and the read counts copied (those
   of the rows written since the first copy), then ACCESS EXCLUSIVE just for the moves between
   schemas. Every lock waits at most
   ``REBUILD_LOCK_TIMEOUT`` (readers queue behind the swap no longer than that); a lock not
   granted in time rolls the attempt back, lets readers and writers through, and tries again.
   A statement queued behind the swap, or a prepared statement planned before it, resolves the
   table names again once the swap commits, so it reads and writes the new version;
4. **retires** the previous version (moved to ``PREVIOUS_SCHEMA`` by the swap) by dropping it.

At the swap each shadow ledger holds every command the live model applied (ledger rows and
watermark) and the projection of exactly its ledger, so nothing is lost or applied twice
(guarantee 2); commands the snapshot had and the live projectors had not reached yet are
skipped by them later, as duplicates.
A rebuild that fails before the swap leaves the live version untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .config import Settings, known_secrets, redact_text
from .db import driver_of
from .events import Command
from .projections import Projection, apply_batch
from .projections.base import PROGRESS_TABLE, Carried
from .projections.records import Records
from .rebuild_progress import (
    INITIAL_VERSION,
    ProgressWriter,
    RunProgress,
    live_versions,
    new_run_id,
)

log = logging.getLogger(__name__)

# projector_catchup (the sweep's progress through the write DB, the same for every version) is
# no model's and stays.
SHADOW_SCHEMA = "cqrs_rebuild"
PREVIOUS_SCHEMA = "cqrs_previous"
# The consumer name under which the rebuild's projected commands are counted.
REBUILD_CONSUMER = "rebuild"
# Arbitrary but fixed: one rebuild at a time per read DB.
_REBUILD_LOCK_KEY = 7_310_452_003
# Commands per catch-up statement at most (bytes are bounded by REBUILD_BATCH_MAX_BYTES).
_PAGE_COMMANDS = 10_000
# Catch up outside the locks while more than this many commands are missing; the rest is
# applied inside the swap, while the projectors wait.
_SWAP_REMAINDER = 2_000
_CATCH_UP_ROUNDS = 20
# Ids per range of the load: each range is piped, projected and its staging emptied in turn.
_LOAD_RANGE = 250_000
# Bulk steps scale with the write DB, so they get their own bound instead of the per-statement
# command timeout of request handling.
_BULK_TIMEOUT = 6 * 3600.0

# A database refusing or gone, or a statement over its timeout.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# The commands of the load's snapshot, staged in the shadow (unlogged: it lives one rebuild)
# for the models' effects to read as the projectors' batches read theirs.
_STAGED = f"{SHADOW_SCHEMA}.staged_commands"
_STAGE_COLUMNS = ["position", "key", "value", "event_type", "created_at"]
_STAGED_APPLIED = f"(SELECT position, key, event_type, created_at FROM {_STAGED})"


class RebuildError(RuntimeError):
    """A rebuild that could not finish; the live read model is as it was."""


async def rebuild(
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    settings: Settings,
    listener: Callable[[RunProgress], None] | None = None,
    models: Sequence[type[Projection]] = (Records,),
    *,
    run_id: str | None = None,
    version: int | None = None,
) -> int:
    """Replace ``models`` with the projection of every command; return the command count.

    Readers are served from the live versions throughout and projectors keep projecting into
    them; the new versions are swapped in atomically at the end, with the read counts. See the
    module's docstring for the steps and their locks. The run is recorded in ``rebuild_runs``
    as ``run_id`` (default: a new id) building ``version`` (default: the models' newest live
    version + 1); ``listener`` is told each record of it (``rebuild_progress``).
    """
    models = tuple(models)
    async with (
        read_engine.connect() as rsession,
        read_engine.connect() as psession,
        write_engine.connect() as wsession,
    ):
        rconn, pconn, wconn = (
            await _driver(rsession),
            await _driver(psession),
            await _driver(wsession),
        )
        if version is None:
            live = await live_versions(rconn)
            version = max(live.get(model.name, INITIAL_VERSION) for model in models) + 1
        writer = ProgressWriter(
            pconn, run_id or new_run_id(), [m.name for m in models], version, listener
        )
        if not await rconn.fetchval("SELECT pg_try_advisory_lock($1)", _REBUILD_LOCK_KEY):
            await writer.refused("another rebuild of this read DB is running")
            raise RebuildError("another rebuild of this read DB is running")
        try:
            await writer.start()
            done = await _run(wconn, rconn, settings, writer, models)
        finally:
            with contextlib.suppress(*_DB_ERRORS):  # a lost session has lost its lock too
                await rconn.execute("SELECT pg_advisory_unlock($1)", _REBUILD_LOCK_KEY)
    return done


async def _run(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    settings: Settings,
    writer: ProgressWriter,
    models: tuple[type[Projection], ...],
) -> int:
    """Build and swap, recording how the run ends (done, failed or cancelled)."""
    try:
        try:
            done = await _build_and_swap(wconn, rconn, settings, writer, models)
        except BaseException:
            with contextlib.suppress(*_DB_ERRORS):  # never hide why it failed
                await _drop_versions(rconn)
            raise
        await _retire_previous(rconn)
    except (asyncio.CancelledError, KeyboardInterrupt):
        await writer.finish("cancelled", "the rebuild was stopped; the live version is unchanged")
        raise
    except BaseException as exc:
        await writer.finish("failed", _reason(exc))
        raise
    await writer.advance(done, done)
    await writer.finish("done")
    return done


def _reason(exc: BaseException) -> str:
    """Why a run failed, in one line without secrets (what rebuild_runs.error records)."""
    text = str(exc) if isinstance(exc, RebuildError) else f"{type(exc).__name__}: {exc}"
    return redact_text(text.strip(), known_secrets())[:2000]


async def _build_and_swap(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    settings: Settings,
    writer: ProgressWriter,
    models: tuple[type[Projection], ...],
) -> int:
    """Load, catch up and swap; return the commands the new live version holds."""
    live = await _live_schema(rconn)
    await _create_shadow(rconn, live, models)
    loaded = await _load(wconn, rconn, settings, writer, models)
    loaded.read_counts_at = await _copy_all_read_counts(rconn, live, models)
    await writer.enter("catch-up")
    await _catch_up(wconn, rconn, live, loaded, settings, writer)
    caught_up = len(loaded.caught_up)
    await writer.enter("swap")
    swapped = await _swap(wconn, rconn, live, loaded, settings, writer.version)
    done = loaded.commands + caught_up + swapped
    log.info(
        "rebuild swapped in run_id=%s version=%d commands=%d loaded=%d caught_up=%d at_swap=%d",
        writer.run_id,
        writer.version,
        done,
        loaded.commands,
        caught_up,
        swapped,
    )
    return done


async def _driver(conn: AsyncConnection) -> asyncpg.Connection:
    return await driver_of(conn)


def _ident(name: str) -> str:
    """``name`` quoted as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


async def _live_schema(rconn: asyncpg.Connection) -> str:
    """The schema of the live versions: where ``records`` resolves on the search_path."""
    schema = await rconn.fetchval(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass('records')"
    )
    if schema is None:
        raise RebuildError("the read DB has no records table: run `cqrs-stack migrate` first")
    return _ident(str(schema))


def _tables(models: Sequence[type[Projection]]) -> list[str]:
    return [table for model in models for table in model.version_tables()]


async def _create_shadow(
    rconn: asyncpg.Connection, live: str, models: Sequence[type[Projection]] = (Records,)
) -> None:
    """Empty shadow tables shaped as the live ones (columns, defaults, keys, indexes), each
    watermark at 0 (the shadow's ledgers hold every command they apply)."""
    await _drop_versions(rconn)  # what a rebuild that died left behind
    statements = [f"CREATE SCHEMA {SHADOW_SCHEMA}", f"CREATE SCHEMA {PREVIOUS_SCHEMA}"]
    statements += [
        f"CREATE TABLE {SHADOW_SCHEMA}.{table} (LIKE {live}.{table} INCLUDING ALL)"
        for table in _tables(models)
    ]
    statements += [
        f"INSERT INTO {SHADOW_SCHEMA}.{model.watermark()} DEFAULT VALUES" for model in models
    ]
    async with rconn.transaction():
        for statement in statements:
            await rconn.execute(statement)


async def _retire_previous(rconn: asyncpg.Connection) -> None:
    """Drop the version the swap replaced; if a long query still holds it, leave it.

    The swap has committed by now, so a failure here must not fail the rebuild: what is left
    is dropped by the next rebuild.
    """
    try:
        await _drop_versions(rconn)
    except _DB_ERRORS as exc:
        log.warning(
            "rebuild swapped in, the previous version is left in schema %s error=%s",
            PREVIOUS_SCHEMA,
            exc,
        )


async def _drop_versions(rconn: asyncpg.Connection) -> None:
    """Drop the shadow (after a swap: empty) and the previous version."""
    await rconn.execute(
        f"DROP SCHEMA IF EXISTS {PREVIOUS_SCHEMA} CASCADE;"
        f" DROP SCHEMA IF EXISTS {SHADOW_SCHEMA} CASCADE"
    )


@dataclass
class _Loaded:
    """What the shadow holds after the load: every command of one write-DB snapshot."""

    commands: int
    snapshot: str  # pg_snapshot text: what the load saw of the write DB
    models: tuple[type[Projection], ...] = (Records,)
    # Commands beyond the snapshot that are in the shadow by now (applied by catch-up).
    caught_up: set[int] = field(default_factory=set)
    # The read-DB xmin as of which the live read counts were copied.
    read_counts_at: str | None = None


async def _load(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    settings: Settings,
    writer: ProgressWriter,
    models: tuple[type[Projection], ...] = (Records,),
) -> _Loaded:
    """COPY one write-DB snapshot's commands into the shadow, and project them there.

    Range by range of ids (``_LOAD_RANGE``): each is piped into the staging table, projected
    by every model, and the staging table emptied, so the run's progress moves with the load
    and the staging table stays small. Every range is read in the one snapshot.
    """
    live = await _live_schema(rconn)
    await rconn.execute(
        f"CREATE UNLOGGED TABLE {_STAGED} (position bigint, key text, value text,"
        " event_type text, created_at timestamptz)"
    )
    async with wconn.transaction(isolation="repeatable_read", readonly=True):
        total, low, high, last_at, snapshot = await wconn.fetchrow(
            "SELECT count(*), coalesce(min(id), 1), coalesce(max(id), 0), max(created_at),"
            " pg_current_snapshot()::text FROM commands"
        )
        await writer.enter("load", 0, total)
        done = 0
        for start in range(low, high + 1, _LOAD_RANGE):
            done += await _pipe(
                wconn,
                "SELECT id, key, value, event_type, created_at FROM commands"
                f" WHERE id >= {start} AND id < {start + _LOAD_RANGE}",
                rconn,
                "staged_commands",
                _STAGE_COLUMNS,
                settings,
            )
            await _project_staged(rconn, live, models)
            await writer.advance(done)
    if PROGRESS_TABLE in models[0].tables:
        await rconn.execute(
            f"INSERT INTO {SHADOW_SCHEMA}.{PROGRESS_TABLE}"
            " (consumer, events_projected, last_position, last_event_at)"
            " VALUES ($1, $2, $3, $4)",
            REBUILD_CONSUMER,
            total,
            high,
            last_at,
        )
    await rconn.execute(f"DROP TABLE {_STAGED}")
    await writer.advance(int(total))
    return _Loaded(int(total), str(snapshot), models)


async def _project_staged(
    rconn: asyncpg.Connection, live: str, models: tuple[type[Projection], ...]
) -> None:
    """Apply the staged commands to each shadow model (its own statement), then empty it."""
    async with rconn.transaction():
        # The models' own statements, pointed at the shadow for this transaction only.
        await rconn.execute(f"SET LOCAL search_path = {SHADOW_SCHEMA}, {live}")
        for model in models:
            await rconn.execute(
                f"INSERT INTO {model.ledger} (command_id) SELECT position FROM {_STAGED}",
                timeout=_BULK_TIMEOUT,
            )
            await rconn.execute(model.effect_over(_STAGED_APPLIED, _STAGED), timeout=_BULK_TIMEOUT)
        await rconn.execute(f"TRUNCATE {_STAGED}")


async def _pipe(
    source: asyncpg.Connection,
    query: str,
    target: asyncpg.Connection,
    table: str,
    columns: list[str],
    settings: Settings,
) -> int:
    """Binary COPY ``query``'s rows into the shadow's ``table`` (COPY out → COPY in); return
    how many rows.

    The chunks in flight between the two connections never exceed REBUILD_BATCH_MAX_BYTES
    (beyond one chunk of at most one row and a socket read), so memory does not grow with the
    write DB or with the size of its values.
    """
    chunks = _ChunkQueue(settings.rebuild_batch_max_bytes)

    async def collect(chunk: bytes) -> None:
        await chunks.put(bytes(chunk))

    async def produce() -> None:
        try:
            await source.copy_from_query(
                query, output=collect, format="binary", timeout=_BULK_TIMEOUT
            )
        finally:
            await chunks.put(None)

    async def feed() -> AsyncIterator[bytes]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    async with asyncio.TaskGroup() as group:
        group.create_task(produce())
        copied = group.create_task(
            target.copy_to_table(
                table,
                source=feed(),
                columns=columns,
                schema_name=SHADOW_SCHEMA,
                format="binary",
                timeout=_BULK_TIMEOUT,
            )
        )
    return int(copied.result().rpartition(" ")[2])  # its status: "COPY <rows>"


class _ChunkQueue:
    """COPY chunks between two connections, bounded by their total size (None ends it)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._chunks: deque[bytes | None] = deque()
        self._bytes = 0
        self._changed = asyncio.Condition()

    async def put(self, chunk: bytes | None) -> None:
        """Add a chunk once it fits (always when the queue is empty; the end at once)."""
        size = len(chunk) if chunk is not None else 0
        async with self._changed:
            await self._changed.wait_for(
                lambda: not self._chunks or self._bytes + size <= self._max_bytes
            )
            self._chunks.append(chunk)
            self._bytes += size
            self._changed.notify_all()

    async def get(self) -> bytes | None:
        """Take the oldest chunk; None when the producer is done."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._chunks))
            chunk = self._chunks.popleft()
            self._bytes -= len(chunk) if chunk is not None else 0
            self._changed.notify_all()
            return chunk


def _carried(models: Sequence[type[Projection]]) -> list[Carried]:
    return [model.carried for model in models if model.carried is not None]


async def _copy_read_counts(
    rconn: asyncpg.Connection, live: str, since: str | None, models: Sequence[type[Projection]]
) -> None:
    """Give the shadow's rows the live carried columns (read counts), in the caller's
    transaction.

    With ``since`` (a read-DB snapshot's xmin), only the live rows written since are looked at:
    a row version that snapshot did not see was written by a transaction at least as new as
    its xmin (``age`` compares transaction ids across wraparound; a row it flags wrongly is
    merely compared again).
    """
    newer = "" if since is None else " AND age(l.xmin) <= age($1::text::xid8::xid)"
    for c in _carried(models):
        await rconn.execute(
            f"UPDATE {SHADOW_SCHEMA}.{c.table} s SET {c.column} = l.{c.column}"
            f" FROM {live}.{c.table} l"
            f" WHERE s.{c.key} = l.{c.key} AND s.{c.column} IS DISTINCT FROM l.{c.column}{newer}",
            *([] if since is None else [since]),
            timeout=_BULK_TIMEOUT,
        )


async def _copy_all_read_counts(
    rconn: asyncpg.Connection, live: str, models: Sequence[type[Projection]] = (Records,)
) -> str:
    """Copy every live carried column; return the xmin of the snapshot it copied from."""
    async with rconn.transaction(isolation="repeatable_read"):
        xmin = await rconn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        await _copy_read_counts(rconn, live, None, models)
    return str(xmin)


async def _missing_in_shadow(
    wconn: asyncpg.Connection, rconn: asyncpg.Connection, live: str, loaded: _Loaded
) -> list[int]:
    """Command ids that a live model has applied and its shadow has not.

    Only a command the load's snapshot did not see can be one: its transaction id is at
    least the snapshot's xmin, so the write DB's txid index finds them, and the cost grows
    with the writes made during the rebuild, not with the size of the model.
    """
    beyond = await wconn.fetch(
        "SELECT id FROM commands WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)"
        " AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot)",
        loaded.snapshot,
    )
    candidates = [row[0] for row in beyond if row[0] not in loaded.caught_up]
    if not candidates:
        return []
    lacking = " OR ".join(
        f"({m.applied_test('c', live)} AND NOT {m.applied_test('c', SHADOW_SCHEMA)})"
        for m in loaded.models
    )
    rows = await rconn.fetch(
        f"SELECT c FROM unnest($1::bigint[]) AS c WHERE {lacking} ORDER BY c", candidates
    )
    return [row[0] for row in rows]


async def _catch_up(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    live: str,
    loaded: _Loaded,
    settings: Settings,
    writer: ProgressWriter,
) -> None:
    """Apply what the live projectors applied during the load, outside any lock."""
    for _ in range(_CATCH_UP_ROUNDS):
        missing = await _missing_in_shadow(wconn, rconn, live, loaded)
        held = loaded.commands + len(loaded.caught_up)
        await writer.advance(held, held + len(missing))
        for page in await _pages(wconn, missing, settings.rebuild_batch_max_bytes):
            async with rconn.transaction():
                await _apply_to_shadow(wconn, rconn, live, page, loaded.models)
            loaded.caught_up.update(page)
            await writer.advance(loaded.commands + len(loaded.caught_up))
        if len(missing) <= _SWAP_REMAINDER:
            return


async def _pages(wconn: asyncpg.Connection, ids: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Split ``ids`` into pages of at most _PAGE_COMMANDS commands and ``max_bytes`` bytes.

    A page is one statement of arrays, so this also keeps every statement far below
    PostgreSQL's 1 GiB limit whatever the values' sizes; one command larger than
    ``max_bytes`` makes a page of its own.
    """
    if not ids:
        return []
    sizes = await wconn.fetch(
        "SELECT id, octet_length(key) + octet_length(value) FROM commands"
        " WHERE id = ANY($1::bigint[]) ORDER BY id",
        list(ids),
    )
    return list(_split(((row[0], row[1]) for row in sizes), _PAGE_COMMANDS, max_bytes))


def _split(sizes: Iterator[tuple[int, int]], max_count: int, max_bytes: int) -> Iterator[list[int]]:
    page: list[int] = []
    used = 0
    for command_id, size in sizes:
        if page and (len(page) >= max_count or used + size > max_bytes):
            yield page
            page, used = [], 0
        page.append(command_id)
        used += size
    if page:
        yield page


async def _apply_to_shadow(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    live: str,
    ids: list[int],
    models: tuple[type[Projection], ...],
) -> int:
    """Apply the commands ``ids`` to the shadow, in the caller's read-DB transaction."""
    rows = await wconn.fetch(
        "SELECT id, key, value, event_type, created_at FROM commands"
        " WHERE id = ANY($1::bigint[]) ORDER BY id",
        ids,
    )
    # The projectors' own statement, pointed at the shadow for this transaction only.
    await rconn.execute(f"SET LOCAL search_path = {SHADOW_SCHEMA}, {live}")
    consumer = REBUILD_CONSUMER if PROGRESS_TABLE in models[0].tables else None
    counts = await apply_batch(rconn, models, [Command(*row) for row in rows], consumer)
    # A key first written during the load got its shadow row just now, after the copy of
    # every read count, and with 0; a flush of its reads that committed before that copy is
    # not among the rows the swap copies again (those written since). So the live counts of
    # the keys applied here are copied here, from the same transaction: any later flush is.
    for c in _carried(models):
        await rconn.execute(
            f"UPDATE {SHADOW_SCHEMA}.{c.table} s SET {c.column} = l.{c.column}"
            f" FROM {live}.{c.table} l WHERE s.{c.key} = ANY($1::text[]) AND l.{c.key} = s.{c.key}"
            f" AND s.{c.column} IS DISTINCT FROM l.{c.column}",
            list({row[1] for row in rows}),
        )
    return max(counts.values(), default=0)


async def _record_versions(
    rconn: asyncpg.Connection, live: str, models: Sequence[type[Projection]], version: int
) -> None:
    """Record ``version`` as live for ``models``, and the version it replaced, in the swap's
    transaction (so the record changes exactly when the tables do)."""
    await rconn.execute(
        f"INSERT INTO {live}.read_model_versions AS v (model, version, built_at, previous_version,"
        " previous_kept_until)"
        " SELECT m, $2, now(), $3, now() FROM unnest($1::text[]) AS m"
        " ON CONFLICT (model) DO UPDATE SET version = excluded.version, built_at = now(),"
        " previous_version = v.version, previous_kept_until = excluded.previous_kept_until",
        [model.name for model in models],
        version,
        INITIAL_VERSION,
    )


async def _swap(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    live: str,
    loaded: _Loaded,
    settings: Settings,
    version: int,
) -> int:
    """Swap the shadow in as ``version``; return how many commands were applied inside it."""
    wait = settings.rebuild_lock_timeout
    for attempt in range(1, settings.rebuild_swap_attempts + 1):
        try:
            async with rconn.transaction():
                return await _swap_once(wconn, rconn, live, loaded, settings, version)
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            log.info("rebuild swap: a lock was not granted in time, retrying attempt=%d", attempt)
        # Let the readers and writers that queued meanwhile through before the next attempt.
        await asyncio.sleep(random.uniform(wait, 3 * wait))
    raise RebuildError(
        f"the swap did not get its locks in {settings.rebuild_swap_attempts} attempts of"
        f" REBUILD_LOCK_TIMEOUT={wait}s; the live read model is unchanged"
    )


async def _swap_once(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    live: str,
    loaded: _Loaded,
    settings: Settings,
    version: int,
) -> int:
    await rconn.execute(f"SET LOCAL lock_timeout = '{int(settings.rebuild_lock_timeout * 1000)}ms'")
    # A sweep running meanwhile needs no exclusion: its election transaction, which lasts a
    # whole page, holds no lock on these tables, and each piece it applies is a projector
    # transaction like any other: it waits for the EXCLUSIVE lock below and then applies into
    # whichever version is live, where the ledger decides (the shadow holds every command of
    # the live ledger at the swap, so what the sweep found applied stays applied).
    tables = ", ".join(f"{live}.{table}" for table in _tables(loaded.models))
    # EXCLUSIVE: writers (projectors, read-count flushes) wait, plain SELECTs go on.
    await rconn.execute(f"LOCK TABLE {tables} IN EXCLUSIVE MODE")
    writers_held = time.monotonic()
    applied = 0
    missing = await _missing_in_shadow(wconn, rconn, live, loaded)
    for page in await _pages(wconn, missing, settings.rebuild_batch_max_bytes):
        applied += await _apply_to_shadow(wconn, rconn, live, page, loaded.models)
    await _copy_read_counts(rconn, live, loaded.read_counts_at, loaded.models)
    # The only moment readers wait: the moves themselves, at most lock_timeout to get in.
    await rconn.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
    readers_held = time.monotonic()
    for table in _tables(loaded.models):
        await rconn.execute(f"ALTER TABLE {live}.{table} SET SCHEMA {PREVIOUS_SCHEMA}")
        await rconn.execute(f"ALTER TABLE {SHADOW_SCHEMA}.{table} SET SCHEMA {live}")
    moved = time.monotonic()
    await _record_versions(rconn, live, loaded.models, version)
    log.info(
        "rebuild swap: writers waited %.3fs, readers %.3fs; commands applied in the swap %d",
        moved - writers_held,
        moved - readers_held,
        applied,
    )
    return applied
