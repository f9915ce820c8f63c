"""Rebuilding read models from the write DB, beside the live ones, then swapping them in.

A version of a read model is its tables (``Projection.version_tables``: model, ledger,
watermark); the version in the live schema serves reads and is projected into throughout. A
rebuild of one model or several:

1. **loads** a new version into the schema ``SHADOW_SCHEMA``: the commands of one write-DB
   snapshot, range of ids by range, by binary COPY piped with a bounded number of bytes in
   memory, into a staging table there, then each model's own ``effect`` (the statement the
   projectors run) once over the whole staged snapshot; its watermark covers every command
   up to the first the snapshot may lack, and only the commands above get ledger rows (the
   ledgers' indexes built after their rows);
2. **catches up**: applies to the shadow, through the same set-based projection as the
   projectors (``apply_batch``, the shadow first on the ``search_path``), every command
   whose ledger row the live version has and the shadow lacks, in pages bounded by count and
   bytes, outside any lock, until what is left is small. Only a command the snapshot did not
   see can be one, so they are found through the write DB's txid index: the cost follows the
   writes made during the rebuild, not the size of the model. Each page also copies the live
   read counts of its keys (``Projection.carried``: a key first written during the load had no
   shadow row when every read count was copied);
   then **verifies** the shadow against each model's pure function for
   ``REBUILD_VERIFY_SAMPLE`` keys (``verify``), outside any lock: a difference fails the run;
3. **swaps** in one transaction: SHARE UPDATE EXCLUSIVE on every table it moves or drops
   (waited for past ``deadlock_timeout``, so that an autovacuum of one gives way; readers and
   writers never wait on it), EXCLUSIVE locks on the live tables (projectors and read-count
   flushes wait, readers do not), the last remainder applied and the read counts copied (those
   of the rows written since the last copy, made just before the transaction, outside the
   locks), then ACCESS EXCLUSIVE just for the moves between schemas. Every other lock waits at
   most
   ``REBUILD_LOCK_TIMEOUT`` (readers queue behind the swap no longer than that); a lock not
   granted in time rolls the attempt back, lets readers and writers through, and tries again.
   A statement queued behind the swap, or a prepared statement planned before it, resolves the
   table names again once the swap commits, so it reads and writes the new version. What the
   live tables carry beyond their shape (owner, privileges, storage parameters) is given to
   the shadow before the locks and checked again after the moves (``table_attributes``);
4. **keeps** the previous version (moved to ``PREVIOUS_SCHEMA`` by the swap, superseding the
   one kept there) for REBUILD_KEEP_PREVIOUS_SECONDS, recorded in ``read_model_versions``;
   ``drop_expired_previous`` drops it then (each rebuild, and the projectors' housekeeping).
   ``rollback`` moves it into the shadow's place (marking the shadow as holding it, so a
   rollback killed before its swap has it given back by the next run, never dropped), catches
   it up with what the live version applied since (its watermark bounds what it can lack), and
   swaps it back the same way. A stop after a swap's commit only skips the clean-up.

Each run records its progress in ``rebuild_runs`` (``rebuild_progress``), through a connection
of its own, never in the swap's transaction.

At the swap each shadow ledger holds every command the live model applied (ledger rows and
watermark) and the projection of exactly its ledger, so nothing is lost or applied twice
(guarantee 2); commands the snapshot had and the live projectors had not reached yet are
skipped by them later, as duplicates.
A rebuild that fails before the swap leaves the live version untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .config import Settings, known_secrets, redact_text
from .db import driver_of, quote_ident, session_ended
from .events import Command
from .projections import Projection, apply_batch
from .projections.base import PROGRESS_TABLE, Carried
from .projections.ledger import LAST_ID_SQL, WRITERS_SQL, Fence, writers_left_sql
from .projections.records import Records
from .rebuild_progress import (
    INITIAL_VERSION,
    ProgressWriter,
    RunProgress,
    live_versions,
    new_run_id,
)
from .table_attributes import make_like
from .verify import keys_differences, pages_by_bytes, sampled_keys, whole_differences

log = logging.getLogger(__name__)

# projector_catchup (the sweep's progress through the write DB, the same for every version) is
# no model's and stays.
SHADOW_SCHEMA = "cqrs_rebuild"
PREVIOUS_SCHEMA = "cqrs_previous"
# The shadow schema's comment while it holds kept previous versions (then the models' names).
_HOLDS_PREVIOUS = "cqrs-stack: holds the kept previous version of "
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
# Ids per range of the load's COPY: progress moves range by range (and within one, through
# pg_stat_progress_copy). Every range goes into the one staging table: the models' effects run
# once over the whole snapshot, so each model row is written once, not once per range (a key
# met in every range was upserted as often: 10 M commands over 1 M keys took 174 s so, 18 s
# in one statement).
_LOAD_RANGE = 1_000_000
# The copy counts for this fraction (1/n) of the commands in the run's progress, the models'
# effects over the staged snapshot for the rest: measured about even at 10 M commands.
_COPY_SHARE = 2
# The load's read-DB session: sorts and hashes of the effects in memory up to this much each
# (not spilled at 4 MB, the server's default), and the deferred ledger indexes sorted in this.
_LOAD_WORK_MEM = "64MB"
_LOAD_MAINTENANCE_WORK_MEM = "256MB"
# Bulk steps scale with the write DB, so they get their own bound instead of the per-statement
# command timeout of request handling.
_BULK_TIMEOUT = 6 * 3600.0

# A database refusing or gone, or a statement over its timeout.
# InternalClientError: a session left mid-protocol (a COPY cut halfway) refuses every use.
_DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
# How long a swap interrupted during its COMMIT waits for the read DB to say whether it
# committed: well within the 20 s a stopped run has to end in (cli._STOP_WITHIN), itself within
# Kubernetes' default 30 s grace period.
_COMMIT_CHECK_TIMEOUT = 10.0
_POLL = 0.1
# How long the load waits for the write transactions open as it began to end, to know which
# commands its snapshot holds all of (``_loaded_watermark``); a write commits in milliseconds.
_FENCE_WAIT = 5.0
_WRITERS_LEFT = writers_left_sql("$1::text[]")

# The commands of the load's snapshot, staged in the shadow (unlogged, never vacuumed: it lives
# one rebuild, and is only written, then read whole) for the models' effects to read as the
# projectors' batches read theirs. Seen: autovacuum vacuuming 10 M staged rows during the load.
_STAGED = f"{SHADOW_SCHEMA}.staged_commands"
_STAGE_COLUMNS = ["position", "key", "value", "event_type", "created_at"]
_STAGED_APPLIED = f"(SELECT position, key, event_type, created_at FROM {_STAGED})"


class RebuildError(RuntimeError):
    """A rebuild that could not finish; the live read model is as it was."""


# What the read DB says of a command it will not hold (a constraint, a value out of a type's
# range): the command's fault, not the database's, so the same on every try.
_REFUSALS = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)


@contextlib.contextmanager
def _refusals_named(first: int, last: int) -> Iterator[None]:
    """Translate the read DB refusing one of the commands at positions ``first``..``last``
    into a RebuildError naming them, the constraint and the SQLSTATE, never the row: its
    DETAIL holds the command's value, and the error is recorded and shown (rebuild_runs,
    the CqrsStack's status and Events)."""
    try:
        yield
    except _REFUSALS as exc:
        where = f"position {first}" if first == last else f"positions {first} to {last}"
        what = ", ".join(
            f"{name} {value}"
            for name, value in (
                ("constraint", getattr(exc, "constraint_name", None)),
                ("of table", getattr(exc, "table_name", None)),
                ("column", getattr(exc, "column_name", None)),
            )
            if value
        )
        raise RebuildError(
            f"the read DB refuses the command at {where} ({what or type(exc).__name__},"
            f" SQLSTATE {exc.sqlstate}): the rebuild cannot hold it; change the constraint or"
            " the command (`cqrs-stack dlq list` shows the commands the projectors could not"
            " apply); the live read model is unchanged"
        ) from None


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
    them; the new versions are swapped in atomically at the end, with the read counts, and
    the versions they replace kept for REBUILD_KEEP_PREVIOUS_SECONDS (``rollback``). See the
    module's docstring for the steps and their locks. The run is recorded in ``rebuild_runs``
    as ``run_id`` (default: a new id) building ``version`` (default: the models' newest live
    version + 1); ``listener`` is told each record of it (``rebuild_progress``).
    """
    models = tuple(models)

    async def version_of(rconn: asyncpg.Connection) -> int:
        if version is not None:
            return version
        live = await live_versions(rconn)
        return max(live.get(model.name, INITIAL_VERSION) for model in models) + 1

    async def build(wconn: asyncpg.Connection, rconn: asyncpg.Connection, run: _Run) -> int:
        return await _build_and_swap(wconn, rconn, settings, run.writer, models, run.success)

    run = _Run(models, run_id, listener, settings.rebuild_runs_kept, "done", "load")
    return await run.under_lock(write_engine, read_engine, version_of, build)


async def rollback(
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    settings: Settings,
    listener: Callable[[RunProgress], None] | None = None,
    models: Sequence[type[Projection]] = (Records,),
    *,
    run_id: str | None = None,
) -> int:
    """Swap the kept previous version of ``models`` back in; return the commands it caught
    up with (those applied since the swap that replaced it).

    The previous version is caught up exactly as a shadow (so nothing applied to the live
    version since is lost, or applied twice), then swapped in by the same bounded-lock swap
    with the read counts; the version it replaces is kept in its place, for as long. A model
    without a kept previous version (none, expired or dropped) fails it, nothing changed.
    """
    models = tuple(models)

    async def version_of(rconn: asyncpg.Connection) -> int:
        # The record only: its tables are checked under the lock, once a previous version a
        # killed rollback left in the shadow is given back (_Run._locked).
        return max((await _kept_previous(rconn, models, tables=False)).values())

    async def swap_back(wconn: asyncpg.Connection, rconn: asyncpg.Connection, run: _Run) -> int:
        return await _roll_back(wconn, rconn, settings, run.writer, models, run.success)

    run = _Run(models, run_id, listener, settings.rebuild_runs_kept, "rolled-back", "catch-up")
    return await run.under_lock(write_engine, read_engine, version_of, swap_back)


@contextlib.asynccontextmanager
async def _sessions(
    write_engine: AsyncEngine, read_engine: AsyncEngine
) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection, asyncpg.Connection]]:
    """The write-DB connection, the read-DB one of the work, and the progress writer's own.

    The work's sessions start no parallel workers: a rebuild is background work, one backend
    per database. Its bulk statements (the snapshot's count of every command, the verify's
    distinct keys) ran with two workers each, three processes on a two-core machine, and the
    readers of the live model queued for a core meanwhile.
    """
    async with (
        read_engine.connect() as rsession,
        read_engine.connect() as psession,
        write_engine.connect() as wsession,
    ):
        wconn, rconn = await _driver(wsession), await _driver(rsession)
        for conn in (wconn, rconn):
            await conn.execute(_SERIAL)
        try:
            yield wconn, rconn, await _driver(psession)
        finally:
            for conn in (wconn, rconn):  # pooled: the next user gets the server's settings
                with contextlib.suppress(*_DB_ERRORS):
                    await conn.execute(_UNSERIAL, timeout=_COMMIT_CHECK_TIMEOUT)


_PARALLEL = ("max_parallel_workers_per_gather", "max_parallel_maintenance_workers")
_SERIAL = "; ".join(f"SET {name} = 0" for name in _PARALLEL)
_UNSERIAL = "; ".join(f"RESET {name}" for name in _PARALLEL)


@dataclass
class _Run:
    """One recorded run of a rebuild or a rollback: what ``rebuild`` and ``rollback`` share.

    ``success`` is the phase its swap's commit records (``_swapped``), ``first_phase`` the one
    it starts in; ``writer`` exists once its sessions are open. Its start prunes the finished
    runs but the newest ``kept_runs`` (REBUILD_RUNS_KEPT).
    """

    models: tuple[type[Projection], ...]
    run_id: str | None
    listener: Callable[[RunProgress], None] | None
    kept_runs: int
    success: str
    first_phase: str
    writer: ProgressWriter = field(init=False)

    @property
    def swapped(self) -> bool:
        """Has the run's swap committed (and its record been started)?"""
        return hasattr(self, "writer") and self.writer.phase == self.success

    async def under_lock(
        self,
        write_engine: AsyncEngine,
        read_engine: AsyncEngine,
        version_of: Callable[[asyncpg.Connection], Awaitable[int]],
        work: Callable[[asyncpg.Connection, asyncpg.Connection, _Run], Awaitable[int]],
    ) -> int:
        """Open the sessions, record the run as building ``version_of`` (the read DB's answer)
        and run ``work`` holding the read DB's rebuild lock; return what it returns.

        A cancel once the swap committed (SIGTERM, Ctrl-C while the lock is given back or the
        sessions close) is no cancel: the run returns its count as swapped.
        """
        try:
            async with _sessions(write_engine, read_engine) as (wconn, rconn, pconn):
                self.writer = ProgressWriter(
                    pconn,
                    self.run_id or new_run_id(),
                    [m.name for m in self.models],
                    await version_of(rconn),
                    self.listener,
                )
                return await self._locked(wconn, rconn, work)
        except asyncio.CancelledError:
            if not self.swapped:
                raise
            _uncancel()
            log.warning("swapped; a stop after the swap only cut its clean-up short")
            return self.writer.done

    async def _locked(
        self,
        wconn: asyncpg.Connection,
        rconn: asyncpg.Connection,
        work: Callable[[asyncpg.Connection, asyncpg.Connection, _Run], Awaitable[int]],
    ) -> int:
        """Run ``work`` holding the read DB's rebuild lock, recording how it ends: failed or
        cancelled, unless ``work`` recorded ``success`` (at its swap's commit: what follows
        is clean-up, whose failure is only logged)."""
        writer = self.writer
        if not await rconn.fetchval("SELECT pg_try_advisory_lock($1)", _REBUILD_LOCK_KEY):
            await writer.refused("another rebuild of this read DB is running")
            raise RebuildError("another rebuild of this read DB is running")
        try:
            # A rollback killed before its swap left the previous version in the shadow: kept
            # again before anything else (a rebuild would drop the shadow, a rollback look for
            # it).
            await restore_stranded_previous(rconn)
            await writer.start(self.first_phase)
            await writer.prune(self.kept_runs)
            try:
                return await work(wconn, rconn, self)
            except (asyncio.CancelledError, KeyboardInterrupt):
                if not writer.finished:  # else it ended at its swap, and stays so recorded
                    await writer.finish(
                        "cancelled", "stopped before the swap; the live version is unchanged"
                    )
                raise
            except BaseException as exc:
                if not writer.finished:
                    await writer.finish("failed", _reason(exc))
                raise
        finally:
            with contextlib.suppress(*_DB_ERRORS):  # a lost session has lost its lock too
                await rconn.execute("SELECT pg_advisory_unlock($1)", _REBUILD_LOCK_KEY)


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
    success: str = "done",
) -> int:
    """Load, catch up, verify and swap; return the commands the new live version holds.

    On any failure the shadow is dropped (the live version and the kept previous one stay).
    """
    live = await _live_schema(rconn)
    await drop_expired_previous(rconn, settings)
    await _create_shadow(rconn, live, models)
    try:
        done = await _load_and_swap(wconn, rconn, live, settings, writer, models)
    except BaseException:
        with contextlib.suppress(*_DB_ERRORS):  # never hide why it failed
            await _drop_shadow(rconn)
        raise
    await _swapped(rconn, models, settings, writer, success, done)
    return done


async def _swapped(
    rconn: asyncpg.Connection,
    models: Sequence[type[Projection]],
    settings: Settings,
    writer: ProgressWriter,
    success: str,
    done: int,
) -> None:
    """Everything after the swap's commit: the run recorded as ``success``, then the clean-up.

    The swap is live once committed, so a cancel (SIGTERM, Ctrl-C) from here on is no cancel:
    the record is finished regardless (it is short), the clean-up skipped (a DROP may wait on a
    lock for long), left to the next run, and the run returns normally.
    """
    recording = asyncio.ensure_future(_record_swapped(writer, success, done))
    try:
        await asyncio.shield(recording)
    except asyncio.CancelledError:
        _uncancel()
        await recording
        log.warning("swapped; cleanup of the old shadow left to the next run")
        return
    try:
        await _after_swap(rconn, models, settings)
    except asyncio.CancelledError:
        _uncancel()
        log.warning("swapped; cleanup of the old shadow left to the next run")


async def _record_swapped(writer: ProgressWriter, success: str, done: int) -> None:
    await writer.advance(done, done)
    await writer.finish(success)


def _uncancel() -> None:
    """Take back the cancel request just absorbed, so the task's later awaits run."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _after_swap(
    rconn: asyncpg.Connection, models: Sequence[type[Projection]], settings: Settings
) -> None:
    """Drop the (empty) shadow, and the previous versions unless kept. The swap committed:
    a failure here is logged, and what is left is dropped by the next run."""
    try:
        await _drop_shadow(rconn)
    except _DB_ERRORS as exc:
        log.warning("swapped in; the empty schema %s is left error=%s", SHADOW_SCHEMA, exc)
    await _retire_previous(rconn, models, settings)


async def _load_and_swap(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    live: str,
    settings: Settings,
    writer: ProgressWriter,
    models: tuple[type[Projection], ...],
) -> int:
    loaded = await _load(wconn, rconn, settings, writer, models)
    with writer.timed("read-counts"):
        loaded.read_counts_at = await _copy_all_read_counts(rconn, live, models, fresh=True)
    await writer.enter("catch-up")
    with writer.timed("catch-up"):
        await _catch_up(wconn, rconn, live, loaded, settings, writer)
    await writer.enter("verify")
    with writer.timed("verify"):
        await _verify(wconn, rconn, live, loaded, settings)
    # What was written during the verification (all of it when every key is verified:
    # seconds on a busy stack) is applied here, outside the locks, not under the swap's lock
    # on projectors and read-count flushes (27,000 commands held them 2.2 s at 3,000 writes/s).
    with writer.timed("catch-up"):
        await _catch_up(wconn, rconn, live, loaded, settings)
    caught_up = len(loaded.caught_up)
    await writer.enter("swap")
    with writer.timed("swap"):
        swapped = await _swap(wconn, rconn, live, loaded, settings, writer.version, writer.conn)
    # Committed: nothing that can be cancelled until _swapped records it.
    done = loaded.commands + caught_up + swapped
    _log_steps(writer, loaded)
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


def _log_steps(writer: ProgressWriter, loaded: _Loaded) -> None:
    """Log where the run's time went: wall seconds per step, and the catch-up's and the
    swap's counts (one JSON object, for a person or a benchmark to read)."""
    steps = {step: round(seconds, 3) for step, seconds in writer.steps.items()}
    log.info(
        "rebuild steps run_id=%s steps=%s",
        writer.run_id,
        json.dumps({**steps, **loaded.stats}, separators=(",", ":")),
    )


async def _driver(conn: AsyncConnection) -> asyncpg.Connection:
    return await driver_of(conn)


async def _live_schema(rconn: asyncpg.Connection) -> str:
    """The schema of the live versions: where ``records`` resolves on the search_path."""
    schema = await rconn.fetchval(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass('records')"
    )
    if schema is None:
        raise RebuildError("the read DB has no records table: run `cqrs-stack migrate` first")
    return quote_ident(str(schema))


def _tables(models: Sequence[type[Projection]]) -> list[str]:
    return [table for model in models for table in model.version_tables()]


async def _create_shadow(
    rconn: asyncpg.Connection, live: str, models: Sequence[type[Projection]] = (Records,)
) -> None:
    """Empty shadow tables shaped as the live ones (columns, defaults, keys, indexes), each
    watermark at 0 (the load raises it; a rollback's previous version has its own)."""
    await _drop_shadow(rconn)  # what a rebuild that died left behind
    statements = [
        f"CREATE SCHEMA {SHADOW_SCHEMA}",
        f"CREATE SCHEMA IF NOT EXISTS {PREVIOUS_SCHEMA}",
    ]
    # No autovacuum of the shadow while it is built: a VACUUM of millions of rows just loaded
    # would compete with the rebuild and the readers for the cores, and the swap cancels it
    # (``_outwait_autovacuum``), wasting what it did. The swap gives it the live table's setting.
    statements += [
        f"CREATE TABLE {SHADOW_SCHEMA}.{table} (LIKE {live}.{table} INCLUDING ALL)"
        " WITH (autovacuum_enabled = false)"
        for table in _tables(models)
    ]
    # The live tables' own storage parameters (an operator's fillfactor or autovacuum tuning)
    # carry over: LIKE ... INCLUDING ALL copies none. autovacuum_enabled is the swap's to set.
    for table in _tables(models):
        kept = [
            option
            for option in await _reloptions(rconn, f"{live}.{table}")
            if not option.startswith("autovacuum_enabled=")
        ]
        if kept:
            statements.append(f"ALTER TABLE {SHADOW_SCHEMA}.{table} SET ({', '.join(kept)})")
    statements += [
        f"INSERT INTO {SHADOW_SCHEMA}.{model.watermark()} DEFAULT VALUES" for model in models
    ]
    async with rconn.transaction():
        for statement in statements:
            await rconn.execute(statement)


async def _reloptions(rconn: asyncpg.Connection, table: str) -> list[str]:
    """``table``'s storage parameters as PostgreSQL keeps them (``name=value``), none if absent."""
    found = await rconn.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = to_regclass($1)", table
    )
    return list(found or [])


async def _drop_shadow(rconn: asyncpg.Connection) -> None:
    """Drop the shadow (after a swap: empty; after a failure: the version it was building).

    A shadow that holds a kept previous version (a rollback that died before its swap) gives
    it back to PREVIOUS_SCHEMA first: it is never dropped with the shadow.
    """
    await restore_stranded_previous(rconn)
    await rconn.execute(f"DROP SCHEMA IF EXISTS {SHADOW_SCHEMA} CASCADE")


async def restore_stranded_previous(rconn: asyncpg.Connection) -> list[str]:
    """Move back to PREVIOUS_SCHEMA the previous version a rollback took into the shadow and
    did not swap in (its process killed); return the models whose it was.

    The rollback marks the shadow (its schema comment, ``_HOLDS_PREVIOUS`` and the models) in
    the transaction that moves the previous version in, so the mark is there exactly while
    the shadow holds it; the move back clears it in one transaction too. The version is as far
    caught up as it got (its ledger says what it holds): still the kept previous version that
    ``read_model_versions`` records.
    """
    from .projections import registered

    mark = await rconn.fetchval(
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1",
        SHADOW_SCHEMA,
    )
    if not isinstance(mark, str) or not mark.startswith(_HOLDS_PREVIOUS):
        return []
    known = registered()
    names = [n for n in mark.removeprefix(_HOLDS_PREVIOUS).split(",") if n in known]
    present = {
        row[0]
        for row in await rconn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1", SHADOW_SCHEMA
        )
    }
    async with rconn.transaction():
        await rconn.execute(f"CREATE SCHEMA IF NOT EXISTS {PREVIOUS_SCHEMA}")
        for table in _tables([known[n] for n in names]):
            if table in present:
                await rconn.execute(
                    f"ALTER TABLE {SHADOW_SCHEMA}.{table} SET SCHEMA {PREVIOUS_SCHEMA}"
                )
        await rconn.execute(f"COMMENT ON SCHEMA {SHADOW_SCHEMA} IS NULL")
    log.warning(
        "a rollback stopped before its swap: the previous version is kept again models=%s",
        ",".join(names),
    )
    return names


async def _retire_previous(
    rconn: asyncpg.Connection, models: Sequence[type[Projection]], settings: Settings
) -> None:
    """With REBUILD_KEEP_PREVIOUS_SECONDS=0, drop the versions the swap replaced at once (its
    record says none is kept); otherwise they stay until ``drop_expired_previous``.

    The swap has committed by now, so a failure here must not fail the run: what is left is
    dropped by the next rebuild, or the projectors' housekeeping (as expired).
    """
    if settings.rebuild_keep_previous_seconds > 0:
        return
    try:
        async with rconn.transaction():
            await _drop_previous_tables(rconn, models)
    except _DB_ERRORS as exc:
        log.warning(
            "swapped in, the previous version is left in schema %s error=%s",
            PREVIOUS_SCHEMA,
            exc,
        )


async def _drop_previous_tables(
    rconn: asyncpg.Connection, models: Sequence[type[Projection]]
) -> None:
    for table in _tables(models):
        await rconn.execute(f"DROP TABLE IF EXISTS {PREVIOUS_SCHEMA}.{table}")


async def drop_expired_previous(rconn: asyncpg.Connection, settings: Settings) -> list[str]:
    """Drop each kept previous version whose time is up; return the models whose it was.

    Run by every rebuild and rollback before it starts, and by the projectors' housekeeping
    (every LEDGER_PRUNE_INTERVAL). It does nothing while a rebuild or rollback runs (their
    lock), and each DROP waits at most REBUILD_LOCK_TIMEOUT for a query still reading the
    version (then it is left for the next round).
    """
    from .projections import registered

    known = registered()
    try:
        async with rconn.transaction():
            if not await rconn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _REBUILD_LOCK_KEY):
                return []
            await rconn.execute(
                f"SET LOCAL lock_timeout = '{int(settings.rebuild_lock_timeout * 1000)}ms'"
            )
            rows = await rconn.fetch(
                "SELECT model FROM read_model_versions WHERE previous_kept_until <= now()"
                " FOR UPDATE"
            )
            expired = [row[0] for row in rows]
            await _drop_previous_tables(rconn, [known[m] for m in expired if m in known])
            await rconn.execute(
                "UPDATE read_model_versions SET previous_version = NULL,"
                " previous_kept_until = NULL WHERE model = ANY($1::text[])",
                expired,
            )
    except asyncpg.LockNotAvailableError:
        log.info("an expired previous version is still read; dropped at the next round")
        return []
    if expired:
        log.info("expired previous versions dropped models=%s", ",".join(expired))
    return expired


async def _kept_previous(
    rconn: asyncpg.Connection, models: Sequence[type[Projection]], tables: bool = True
) -> dict[str, int]:
    """The kept previous version of each of ``models``; RebuildError if one has none (never
    swapped, kept 0 s, expired, or, unless not ``tables``, its tables gone)."""
    rows = await rconn.fetch(
        "SELECT model, previous_version FROM read_model_versions"
        " WHERE model = ANY($1::text[]) AND previous_version IS NOT NULL"
        " AND previous_kept_until > now()",
        [model.name for model in models],
    )
    kept = {row[0]: int(row[1]) for row in rows}
    for model in models:
        present = len(model.version_tables())
        if tables:
            present = await rconn.fetchval(
                "SELECT count(*) FROM pg_tables"
                " WHERE schemaname = $1 AND tablename = ANY($2::text[])",
                PREVIOUS_SCHEMA,
                list(model.version_tables()),
            )
        if model.name not in kept or present != len(model.version_tables()):
            raise RebuildError(
                f"no previous version of {model.name} is kept to roll back to (none was"
                " swapped out, or it expired: REBUILD_KEEP_PREVIOUS_SECONDS); nothing changed"
            )
    return kept


async def _roll_back(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    settings: Settings,
    writer: ProgressWriter,
    models: tuple[type[Projection], ...],
    success: str = "rolled-back",
) -> int:
    """Catch the kept previous versions up as a shadow and swap them in (see ``rollback``).

    A failure before the swap moves them back, as far as they were caught up (their ledgers
    say what they hold), still kept for a rollback.
    """
    live = await _live_schema(rconn)
    await drop_expired_previous(rconn, settings)
    await _kept_previous(rconn, models)  # still there, under the lock
    await _drop_shadow(rconn)
    # Marked in the move's transaction: a process killed from here to the swap's commit leaves
    # the previous version in the shadow, and the next run gives it back (_drop_shadow).
    await _move_tables(rconn, models, PREVIOUS_SCHEMA, SHADOW_SCHEMA, create=True, mark=True)
    try:
        loaded = await _since_previous(wconn, rconn, live, settings, writer, models)
        await writer.enter("catch-up")
        await _catch_up(wconn, rconn, live, loaded, settings, writer)
        await writer.enter("swap")
        swapped = await _swap(wconn, rconn, live, loaded, settings, None, writer.conn)
    except BaseException:
        with contextlib.suppress(*_DB_ERRORS):  # never hide why it failed
            await _move_tables(rconn, models, SHADOW_SCHEMA, PREVIOUS_SCHEMA)
            await _drop_shadow(rconn)
        raise
    done = len(loaded.caught_up) + swapped
    await _swapped(rconn, models, settings, writer, success, done)
    log.info("rolled back run_id=%s models=%s caught_up=%d", writer.run_id, writer.models, done)
    return done


async def _move_tables(
    rconn: asyncpg.Connection,
    models: Sequence[type[Projection]],
    source: str,
    target: str,
    create: bool = False,
    mark: bool = False,
) -> None:
    """Move every version table of ``models`` from schema ``source`` to ``target``; ``mark``:
    record on ``target`` that it holds the previous version (``restore_stranded_previous``),
    else clear such a record of ``source``."""
    async with rconn.transaction():
        if create:
            await rconn.execute(f"CREATE SCHEMA IF NOT EXISTS {target}")
        for table in _tables(models):
            await rconn.execute(f"ALTER TABLE {source}.{table} SET SCHEMA {target}")
        if mark:
            names = ",".join(model.name for model in models)
            await rconn.execute(f"COMMENT ON SCHEMA {target} IS '{_HOLDS_PREVIOUS}{names}'")
        elif source == SHADOW_SCHEMA:
            await rconn.execute(f"COMMENT ON SCHEMA {source} IS NULL")


async def _since_previous(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    live: str,
    settings: Settings,
    writer: ProgressWriter,
    models: tuple[type[Projection], ...],
) -> _Loaded:
    """Apply to the shadow (the previous versions) what the live versions applied since it
    was swapped out, as of one write-DB snapshot; from then on, catching up is a rebuild's.

    Every command at or below the lowest watermark of the previous versions is in them; of
    those above it that the snapshot sees, each the live version applied and the previous
    one lacks is applied. A command the snapshot does not see is found later, through the
    txid index (``_missing_in_shadow``), as after a load. The ids above the watermark are
    held here at once: as many as the commands written since that swap.
    """
    low = min(
        [
            int(await rconn.fetchval(f"SELECT position FROM {SHADOW_SCHEMA}.{m.watermark()}"))
            for m in models
        ]
    )
    async with wconn.transaction(isolation="repeatable_read", readonly=True):
        snapshot = await wconn.fetchval("SELECT pg_current_snapshot()::text")
        rows = await wconn.fetch(
            "SELECT id FROM commands WHERE id > $1 ORDER BY id", low, timeout=_BULK_TIMEOUT
        )
    loaded = _Loaded(0, str(snapshot), models)
    loaded.read_counts_at = await _copy_all_read_counts(rconn, live, models)
    lacking = " OR ".join(
        f"({m.applied_test('c', live)} AND NOT {m.applied_test('c', SHADOW_SCHEMA)})"
        for m in models
    )
    missing = [
        row[0]
        for row in await rconn.fetch(
            f"SELECT c FROM unnest($1::bigint[]) AS c WHERE {lacking} ORDER BY c",
            [row[0] for row in rows],
            timeout=_BULK_TIMEOUT,
        )
    ]
    await writer.enter("catch-up", 0, len(missing))
    for page in await _pages(wconn, missing, settings.rebuild_batch_max_bytes):
        async with rconn.transaction():
            await _apply_to_shadow(wconn, rconn, live, page, models)
        loaded.caught_up.update(page)
        await writer.advance(len(loaded.caught_up))
    return loaded


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
    # Counts and waits of the catch-up and the swap, logged at the end (``_log_steps``).
    stats: dict[str, float] = field(default_factory=dict)


async def _load(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    settings: Settings,
    writer: ProgressWriter,
    models: tuple[type[Projection], ...] = (Records,),
) -> _Loaded:
    """COPY one write-DB snapshot's commands into the shadow, and project them there.

    Range by range of ids (``_LOAD_RANGE``), each range is piped into the staging table, all
    in the one snapshot (which the write DB keeps for the copy only). Then each model's own
    effect, one statement over the whole staged snapshot, and its watermark set to the
    highest id below which the snapshot has every command (``_loaded_watermark``): only the
    staged commands above it get ledger rows (usually none: 10 M ledger rows took a quarter
    of a rebuild's time, and their WAL slowed the readers), into a ledger without its
    indexes; the indexes are built, the shadow analysed, the staging dropped.
    The staging table takes about the commands' size on the read DB's disk meanwhile.
    """
    live = await _live_schema(rconn)
    await rconn.execute(
        f"CREATE UNLOGGED TABLE {_STAGED} (position bigint, key text, value text,"
        " event_type text, created_at timestamptz) WITH (autovacuum_enabled = false)"
    )
    fence = await _write_fence(wconn)  # before the snapshot: see _loaded_watermark
    async with _snapshot(wconn):
        total, low, high, last_at, snapshot = await wconn.fetchrow(
            "SELECT count(*), coalesce(min(id), 1), coalesce(max(id), 0), max(created_at),"
            " pg_current_snapshot()::text FROM commands"
        )
        await writer.enter("load", 0, total)
        copied = 0
        for start in range(low, high + 1, _LOAD_RANGE):
            async with _copy_progress(rconn, writer, copied):
                with writer.timed("copy"):
                    copied += await _pipe(
                        wconn,
                        "SELECT id, key, value, event_type, created_at FROM commands"
                        f" WHERE id >= {start} AND id < {start + _LOAD_RANGE}",
                        rconn,
                        "staged_commands",
                        _STAGE_COLUMNS,
                        settings,
                    )
            await writer.advance(copied // _COPY_SHARE)
    mark = await _loaded_watermark(wconn, fence, str(snapshot))
    log.info("rebuild load: commands=%d watermark=%d", total, mark)
    await _project_staged(rconn, live, models, writer, int(total), mark)
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
    # Planner statistics of the new version, for the catch-up's and the readers' plans after
    # the swap (a table swapped in is otherwise unanalysed until autovacuum comes by).
    with writer.timed("analyze"):
        for table in _tables(models):
            await rconn.execute(f"ANALYZE {SHADOW_SCHEMA}.{table}", timeout=_BULK_TIMEOUT)
    await writer.advance(int(total))
    return _Loaded(int(total), str(snapshot), models)


@contextlib.asynccontextmanager
async def _snapshot(wconn: asyncpg.Connection) -> AsyncIterator[None]:
    """A read-only REPEATABLE READ transaction on ``wconn``, whose rollback never hides the
    failure that ends it: a COPY cut halfway (the other side of the pipe lost) leaves the
    session unusable, so its rollback fails too, and asyncpg's own transaction block raised
    that instead (an "internal client error" where the read DB's session had been lost)."""
    await wconn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield
    except BaseException:
        with contextlib.suppress(*_DB_ERRORS):
            await wconn.execute("ROLLBACK")
        raise
    await wconn.execute("COMMIT")


async def _write_fence(wconn: asyncpg.Connection) -> Fence:
    """The write DB's last command id drawn, then the transactions writing ``commands`` (the
    ledger pruner's fence: every id at or below it was drawn by one of them or by a
    transaction already ended)."""
    last = int(await wconn.fetchval(LAST_ID_SQL) or 0)  # 0: no fence (LAST_ID_SQL)
    writers = await wconn.fetchval(WRITERS_SQL)
    return Fence(last, tuple(writers or ()))


async def _loaded_watermark(wconn: asyncpg.Connection, fence: Fence, snapshot: str) -> int:
    """The highest id W such that the load's ``snapshot`` has every command at or below W that
    will ever exist; 0 when that is not known within ``_FENCE_WAIT``.

    ``fence`` was taken before the snapshot. Once none of its writers is left, every command at
    or below its id is committed or never will be; one committed and not in the snapshot was
    written by a transaction still open when the snapshot was taken (one ended before it is
    in it), so its transaction id is at least the snapshot's xmin and the txid index finds it.
    W stops just below the first of those: the catch-up applies them (with ledger rows) and
    nothing at or below W is missing from the load. A writer left open for long (an idle
    transaction, a prepared one) gives 0, and so does a sequence that hands out ids in blocks:
    every staged command then gets its ledger row, as the watermark's absence requires.
    """
    if not fence.position:
        return 0  # no command, or ids handed out in blocks (LAST_ID_SQL): no fence
    for _ in range(int(_FENCE_WAIT / _POLL)):
        if not await wconn.fetchval(_WRITERS_LEFT, list(fence.writers)):
            break
        await asyncio.sleep(_POLL)
    else:
        log.info(
            "rebuild: a write-DB transaction open since the load began (or a prepared one)"
            " is still open; every loaded command gets its ledger row"
        )
        return 0
    first_unseen = await wconn.fetchval(
        "SELECT min(id) FROM commands WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)"
        " AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot) AND id <= $2",
        snapshot,
        fence.position,
    )
    return fence.position if first_unseen is None else int(first_unseen) - 1


@contextlib.asynccontextmanager
async def _copy_progress(
    rconn: asyncpg.Connection, writer: ProgressWriter, done: int
) -> AsyncIterator[None]:
    """While a range is piped: count its rows copied so far (``pg_stat_progress_copy`` of
    ``rconn``'s backend) as 1/_COPY_SHARE of them done, the rest being their projection."""
    pid = rconn.get_server_pid()
    stop = asyncio.Event()

    async def tick() -> None:
        # Never cancelled mid-statement: the writer's connection stays usable after.
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), writer.interval)
                return
            copied = await writer.conn.fetchval(
                "SELECT tuples_processed FROM pg_stat_progress_copy WHERE pid = $1", pid
            )
            if copied is not None:
                await writer.advance((done + int(copied)) // _COPY_SHARE)

    ticking = asyncio.create_task(tick())
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(*_DB_ERRORS):
            await ticking


async def _project_staged(
    rconn: asyncpg.Connection,
    live: str,
    models: tuple[type[Projection], ...],
    writer: ProgressWriter,
    total: int,
    mark: int,
) -> None:
    """Apply the staged snapshot to each shadow model (its watermark at ``mark``, ledger rows
    for the commands above it, then its own effect), drop the staging table and build the
    ledgers' indexes, in one transaction."""
    span = await rconn.fetchrow(f"SELECT min(position), max(position) FROM {_STAGED}")
    share = total - total // _COPY_SHARE
    with _refusals_named(span[0] or 0, span[1] or 0):
        async with rconn.transaction():
            # The models' own statements, pointed at the shadow for this transaction only.
            await rconn.execute(f"SET LOCAL search_path = {SHADOW_SCHEMA}, {live}")
            await rconn.execute(f"SET LOCAL work_mem = '{_LOAD_WORK_MEM}'")
            await rconn.execute(f"SET LOCAL maintenance_work_mem = '{_LOAD_MAINTENANCE_WORK_MEM}'")
            deferred = await _drop_indexes(rconn, [model.ledger for model in models])
            for done, model in enumerate(models, 1):
                with writer.timed("ledger"):
                    status = await rconn.execute(
                        f"INSERT INTO {model.ledger} (command_id)"
                        f" SELECT position FROM {_STAGED} WHERE position > $1",
                        mark,
                        timeout=_BULK_TIMEOUT,
                    )
                    # ``pruned`` counts the commands applied at or below the watermark, as if
                    # the pruner had removed their rows (the model's figures add the two).
                    await rconn.execute(
                        f"UPDATE {model.watermark()} SET position = $1, pruned = $2",
                        mark,
                        total - int(status.rpartition(" ")[2]),
                    )
                with writer.timed("project"):
                    await rconn.execute(
                        model.effect_over(_STAGED_APPLIED, _STAGED), timeout=_BULK_TIMEOUT
                    )
                await writer.advance(total // _COPY_SHARE + share * done // len(models))
            await rconn.execute(f"DROP TABLE {_STAGED}")
            with writer.timed("indexes"):
                for statement in deferred:
                    await rconn.execute(statement, timeout=_BULK_TIMEOUT)


async def _drop_indexes(rconn: asyncpg.Connection, tables: Sequence[str]) -> list[str]:
    """Drop the indexes (and the constraints they back) of the shadow's ``tables``; return the
    statements that build them again as they were, in the caller's transaction."""
    rows = await rconn.fetch(
        "SELECT t.relname, i.relname AS index, c.conname, pg_get_constraintdef(c.oid),"
        " pg_get_indexdef(x.indexrelid)"
        " FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid"
        " JOIN pg_class i ON i.oid = x.indexrelid"
        " JOIN pg_namespace n ON n.oid = t.relnamespace"
        " LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = t.oid"
        " WHERE n.nspname = $1 AND t.relname = ANY($2::text[])",
        SHADOW_SCHEMA,
        list(tables),
    )
    build: list[str] = []
    for table, index, constraint, constraint_def, index_def in rows:
        if constraint is not None:
            await rconn.execute(
                f"ALTER TABLE {SHADOW_SCHEMA}.{quote_ident(table)}"
                f" DROP CONSTRAINT {quote_ident(constraint)}"
            )
            build.append(
                f"ALTER TABLE {SHADOW_SCHEMA}.{quote_ident(table)}"
                f" ADD CONSTRAINT {quote_ident(constraint)} {constraint_def}"
            )
        else:
            await rconn.execute(f"DROP INDEX {SHADOW_SCHEMA}.{quote_ident(index)}")
            build.append(index_def)
    return build


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
        # The end is put only after a whole COPY: a failed side cancels the other (the task
        # group), and an end put from a cancelled producer would wait for a drain that the
        # failed consumer never does.
        await source.copy_from_query(query, output=collect, format="binary", timeout=_BULK_TIMEOUT)
        await chunks.put(None)

    async def feed() -> AsyncIterator[bytes]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    async def watch() -> None:
        # The driver's COPY IN waits for its socket to take more without noticing that the
        # connection is gone (a backend terminated while the pipe was full hung the rebuild
        # until _BULK_TIMEOUT): a session found closed fails the copy.
        while True:
            await asyncio.sleep(_POLL)
            for conn, side in ((source, "write"), (target, "read")):
                if conn.is_closed():
                    raise asyncpg.ConnectionDoesNotExistError(
                        f"the {side} DB's session was lost during the load's COPY"
                    )

    try:
        async with asyncio.TaskGroup() as group:
            watching = group.create_task(watch())
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
            copied.add_done_callback(lambda _: watching.cancel())
    except BaseExceptionGroup as failed:
        # The side that failed first, as the callers' translations of errors expect.
        raise failed.exceptions[0] from None
    return int(copied.result().rpartition(" ")[2])  # its status: "COPY <rows>"


class _ChunkQueue:
    """COPY chunks between two connections, bounded by their total size (None ends it).

    Filled, then drained, in turns: the source's COPY waits while the chunks are written to
    the target, and the target's while the source fills the queue again. A pipe that ran both
    at once kept both servers' backends (and this process) busy: on two cores the readers
    of the live model queued for a core behind them (their p99 in 1 s windows 3-6 x during
    the copy at 10 M commands, against 1-3 x during the projection, one backend busy; 1.6-3 x
    in turns); in turns the copy takes about a third longer alone.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._chunks: deque[bytes | None] = deque()
        self._bytes = 0
        self._draining = False
        self._changed = asyncio.Condition()

    async def put(self, chunk: bytes | None) -> None:
        """Add a chunk once it fits (always when the queue is empty; the end at once), after
        the chunks before have been drained when it does not."""
        size = len(chunk) if chunk is not None else 0
        async with self._changed:
            if self._chunks and (chunk is None or self._bytes + size > self._max_bytes):
                self._draining = True
                self._changed.notify_all()
            await self._changed.wait_for(lambda: not self._draining)
            self._chunks.append(chunk)
            self._bytes += size
            if chunk is None:
                self._draining = True
            self._changed.notify_all()

    async def get(self) -> bytes | None:
        """Take the oldest chunk once the queue is full or ended; None when the producer is
        done."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._draining and bool(self._chunks))
            chunk = self._chunks.popleft()
            self._bytes -= len(chunk) if chunk is not None else 0
            if not self._chunks:
                self._draining = False
            self._changed.notify_all()
            return chunk


def _carried(models: Sequence[type[Projection]]) -> list[Carried]:
    return [model.carried for model in models if model.carried is not None]


async def _copy_read_counts(
    rconn: asyncpg.Connection,
    live: str,
    since: str | None,
    models: Sequence[type[Projection]],
    fresh: bool = False,
) -> int:
    """Give the shadow's rows the live carried columns (read counts), in the caller's
    transaction; return how many rows it wrote.

    With ``since`` (a read-DB snapshot's xmin), only the live rows written since are looked at:
    a row version that snapshot did not see was written by a transaction at least as new as
    its xmin (``age`` compares transaction ids across wraparound; a row it flags wrongly is
    merely compared again). ``fresh``: the shadow was just loaded, so each of its carried
    columns holds the column's (constant) default: only the live rows that hold another value
    are joined. At 1 M keys of which some ten thousand were read, joining every live row took
    25 s under load (a hash of 1 M rows, spilled), for the same rows written.
    """
    newer = "" if since is None else " AND age(l.xmin) <= age($1::text::xid8::xid)"
    copied = 0
    for c in _carried(models):
        other = ""
        if fresh:
            default = await rconn.fetchval(
                "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a"
                " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
                " WHERE a.attrelid = to_regclass($1) AND a.attname = $2",
                f"{SHADOW_SCHEMA}.{c.table}",
                c.column,
            )
            other = (
                f" AND l.{c.column} IS NOT NULL"
                if default is None
                else f" AND l.{c.column} IS DISTINCT FROM ({default})"
            )
        status = await rconn.execute(
            f"UPDATE {SHADOW_SCHEMA}.{c.table} s SET {c.column} = l.{c.column}"
            f" FROM {live}.{c.table} l"
            f" WHERE s.{c.key} = l.{c.key} AND s.{c.column} IS DISTINCT FROM l.{c.column}"
            f"{newer}{other}",
            *([] if since is None else [since]),
            timeout=_BULK_TIMEOUT,
        )
        copied += int(status.rpartition(" ")[2])
    return copied


async def _copy_all_read_counts(
    rconn: asyncpg.Connection,
    live: str,
    models: Sequence[type[Projection]] = (Records,),
    since: str | None = None,
    fresh: bool = False,
) -> str:
    """Copy every live carried column (with ``since``: of the rows written since; ``fresh``:
    see ``_copy_read_counts``); return the xmin of the snapshot it copied from."""
    async with rconn.transaction(isolation="repeatable_read"):
        xmin = await rconn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        await _copy_read_counts(rconn, live, since, models, fresh)
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
    writer: ProgressWriter | None = None,
) -> None:
    """Apply what the live projectors applied during the load, outside any lock."""
    for rounds in range(1, _CATCH_UP_ROUNDS + 1):
        loaded.stats["catch_up_rounds"] = rounds
        found = time.monotonic()
        missing = await _missing_in_shadow(wconn, rconn, live, loaded)
        loaded.stats["catch_up_find_s"] = round(
            loaded.stats.get("catch_up_find_s", 0.0) + time.monotonic() - found, 3
        )
        held = loaded.commands + len(loaded.caught_up)
        if writer is not None:
            await writer.advance(held, held + len(missing))
        for page in await _pages(wconn, missing, settings.rebuild_batch_max_bytes):
            async with rconn.transaction():
                await _apply_to_shadow(wconn, rconn, live, page, loaded.models)
            loaded.caught_up.update(page)
            if writer is not None:
                await writer.advance(loaded.commands + len(loaded.caught_up))
        loaded.stats["catch_up_commands"] = len(loaded.caught_up)
        if len(missing) <= _SWAP_REMAINDER:
            return


async def _verify(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    live: str,
    loaded: _Loaded,
    settings: Settings,
) -> None:
    """Compare the shadow with each model's pure function for REBUILD_VERIFY_SAMPLE keys (0:
    all), outside any lock; RebuildError naming the first difference otherwise.

    Only the rebuild writes the shadow, and each model is compared with the commands its
    shadow ledger holds, so the projectors' writes meanwhile cannot make it differ.
    """
    sample = settings.rebuild_verify_sample
    checked = 0
    async for keys in sampled_keys(wconn, sample):
        # Half the bound each: the commands of a part, and the model's rows of them.
        for part in await pages_by_bytes(wconn, keys, settings.rebuild_batch_max_bytes // 2):
            async with rconn.transaction(readonly=True):
                await rconn.execute(f"SET LOCAL search_path = {SHADOW_SCHEMA}, {live}")
                # The same half for each page of their commands: a key heavier than that
                # alone is folded page by page (Projection.fold), never held whole.
                half = settings.rebuild_batch_max_bytes // 2
                _fail_on(await keys_differences(wconn, rconn, loaded.models, part, half))
        checked += len(keys)
    for model in loaded.models:
        if await model.actual_for(rconn, []) is None:  # not per key: verified whole
            async with rconn.transaction(readonly=True):
                await rconn.execute(f"SET LOCAL search_path = {SHADOW_SCHEMA}, {live}")
                half = settings.rebuild_batch_max_bytes // 2
                _fail_on(await whole_differences(wconn, rconn, model, half))
    log.info("rebuild verified keys=%d sample=%s", checked, sample or "all")


def _fail_on(found: list[str]) -> None:
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise RebuildError(
            f"verify: the new version differs from the pure function: {found[0]}{more};"
            " the live read model is unchanged"
        )


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
    with _refusals_named(min(ids), max(ids)):
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
    rconn: asyncpg.Connection,
    live: str,
    models: Sequence[type[Projection]],
    version: int | None,
    settings: Settings,
) -> None:
    """Record the swap in ``read_model_versions``, in its transaction (so the record changes
    exactly when the tables do): ``version`` live (None: a rollback, the previous one live
    again), the version it replaced kept until REBUILD_KEEP_PREVIOUS_SECONDS from now."""
    keep = settings.rebuild_keep_previous_seconds
    kept = "CASE WHEN $2 > 0 THEN now() + make_interval(secs => $2) END"
    names = [model.name for model in models]
    if version is None:
        await rconn.execute(
            f"UPDATE {live}.read_model_versions SET version = previous_version,"
            " previous_version = CASE WHEN $2 > 0 THEN version END,"
            f" previous_kept_until = {kept}, built_at = now() WHERE model = ANY($1::text[])",
            names,
            keep,
        )
        return
    await rconn.execute(
        f"INSERT INTO {live}.read_model_versions AS v (model, version, built_at, previous_version,"
        f" previous_kept_until) SELECT m, $3, now(), CASE WHEN $2 > 0 THEN $4::integer END,"
        f" {kept} FROM unnest($1::text[]) AS m"
        " ON CONFLICT (model) DO UPDATE SET version = excluded.version, built_at = now(),"
        " previous_version = CASE WHEN $2 > 0 THEN v.version END,"
        " previous_kept_until = excluded.previous_kept_until",
        names,
        keep,
        version,
        INITIAL_VERSION,
    )


async def _swap(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    live: str,
    loaded: _Loaded,
    settings: Settings,
    version: int | None,
    witness: asyncpg.Connection,
) -> int:
    """Swap the shadow in as ``version`` (None: a rollback); return how many commands were
    applied inside the swap. ``witness``: another session of the read DB (the progress
    writer's), which says whether a COMMIT whose session was lost committed."""
    wait = settings.rebuild_lock_timeout
    # The first table of the shadow: live after the commit, whatever its answer says.
    moved = f"{SHADOW_SCHEMA}.{_tables(loaded.models)[0]}"
    shadow_oid = await rconn.fetchval("SELECT to_regclass($1)::oid", moved)
    swap_pid = rconn.get_server_pid()
    # The live tables' owner and privileges, given to the shadow here, outside the locks:
    # thousands of grants take seconds. The swap checks again under its lock and gives what
    # changed since, and the storage parameters (autovacuum stays off on the shadow until its
    # transaction: see _outwait_autovacuum).
    async with rconn.transaction():
        for table in _tables(loaded.models):
            shadow = f"{SHADOW_SCHEMA}.{table}"
            await make_like(rconn, f"{live}.{table}", shadow, lend_schema=True, options=False)
    for attempt in range(1, settings.rebuild_swap_attempts + 1):
        loaded.stats["swap_attempts"] = attempt
        # The read counts flushed since the last copy (during the catch-up and the verify:
        # at 1 M keys under reads, tens of thousands of rows), copied here, outside the locks:
        # the copy under the writers' lock then has only those of the last moments to write.
        # Once: each copy scans every live row (seconds at 1 M keys under load), and repeating
        # it until few rows are left never converged under reads (56 s measured).
        loaded.read_counts_at = await _copy_all_read_counts(
            rconn, live, loaded.models, loaded.read_counts_at
        )
        applied: int | None = None
        try:
            async with rconn.transaction():
                applied = await _swap_once(wconn, rconn, live, loaded, settings, version)
            return applied
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            log.info("rebuild swap: a lock was not granted in time, retrying attempt=%d", attempt)
        except asyncio.CancelledError:
            # Stopped inside the transaction (rolled back), or at its COMMIT, which may have
            # committed all the same (the server had, or does on the cancel: a synchronous
            # standby's wait, a slow fsync).
            if applied is None or not await _committed(rconn, live, loaded.models, shadow_oid):
                raise
            # Live: the run goes on as swapped, the stop asked again so that, as after any
            # commit, it only skips the clean-up.
            log.warning(
                "stopped during the swap's commit, which committed: the new version is live"
            )
            _uncancel()
            task = asyncio.current_task()
            if task is not None:
                task.cancel()
            return applied
        except _DB_ERRORS as exc:
            if not _session_lost(exc):  # the server answered: a refused COMMIT rolled back
                raise
            if applied is None:  # lost before the COMMIT was sent: rolled back
                raise RebuildError(
                    f"the read DB's session was lost during the swap ({type(exc).__name__});"
                    " the live read model is unchanged"
                ) from exc
            # Lost during the COMMIT (terminated by an administrator, a failover, a proxy's
            # cut): the server may have committed all the same.
            if not await _committed_elsewhere(witness, live, loaded.models, shadow_oid, swap_pid):
                raise
            log.warning(
                "the swap's session was lost during its commit (%s), which committed: the new"
                " version is live",
                type(exc).__name__,
            )
            return applied
        # Let the readers and writers that queued meanwhile through before the next attempt.
        await asyncio.sleep(random.uniform(wait, 3 * wait))
    raise RebuildError(
        f"the swap did not get its locks in {settings.rebuild_swap_attempts} attempts of"
        f" REBUILD_LOCK_TIMEOUT={wait}s; the live read model is unchanged"
    )


async def _committed(
    rconn: asyncpg.Connection,
    live: str,
    models: Sequence[type[Projection]],
    shadow_oid: int,
) -> bool:
    """Did the swap whose COMMIT was interrupted commit? The read DB's answer (the shadow's
    first table is live); a RebuildError if it gives none in time, never a guess."""
    table = f"{live}.{_tables(models)[0]}"

    async def live_oid() -> object:
        # The session answers once the interrupted COMMIT has (the driver waits for it). The
        # cancel request may reach the server after that, and cancel this query instead.
        for _ in range(3):
            with contextlib.suppress(asyncpg.QueryCanceledError):
                return await rconn.fetchval("SELECT to_regclass($1)::oid", table)
        return await rconn.fetchval("SELECT to_regclass($1)::oid", table)

    try:
        oid = await asyncio.wait_for(live_oid(), _COMMIT_CHECK_TIMEOUT)
    except _DB_ERRORS as exc:
        raise RebuildError(
            "stopped during the swap's commit, and the read DB did not say whether it"
            f" committed ({type(exc).__name__}); `cqrs-stack status` shows the live version"
        ) from exc
    if rconn.is_in_transaction():  # the stop came before the COMMIT was sent
        await rconn.execute("ROLLBACK")
        return False
    return bool(oid == shadow_oid)


def _session_lost(exc: BaseException) -> bool:
    """Is ``exc`` (one of _DB_ERRORS) the session's end rather than the server's answer to a
    statement? Only a PostgreSQL error is an answer, unless it is a session's end."""
    return session_ended(exc) or not isinstance(exc, asyncpg.PostgresError)


async def _committed_elsewhere(
    witness: asyncpg.Connection,
    live: str,
    models: Sequence[type[Projection]],
    shadow_oid: int,
    swap_pid: int,
) -> bool:
    """Did the swap whose session was lost during its COMMIT commit? Asked on ``witness``
    once the swap's backend is gone (until then its commit may still become visible: a
    synchronous standby's wait); a RebuildError if no answer comes in time, never a guess."""
    table = f"{live}.{_tables(models)[0]}"

    async def answer() -> bool:
        for _ in range(int(_COMMIT_CHECK_TIMEOUT / _POLL)):
            if not await witness.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", swap_pid
            ):
                return bool(
                    await witness.fetchval("SELECT to_regclass($1)::oid", table) == shadow_oid
                )
            await asyncio.sleep(_POLL)
        raise TimeoutError

    try:
        return await asyncio.wait_for(answer(), _COMMIT_CHECK_TIMEOUT)
    except _DB_ERRORS as exc:
        raise RebuildError(
            "the swap's session was lost during its commit, and the read DB did not say"
            f" whether it committed ({type(exc).__name__}); `cqrs-stack status` shows the"
            " live version"
        ) from exc


async def _outwait_autovacuum(
    rconn: asyncpg.Connection,
    live: str,
    models: Sequence[type[Projection]],
    settings: Settings,
) -> None:
    """Take SHARE UPDATE EXCLUSIVE on every table the swap moves or drops, in its transaction,
    waiting past the server's ``deadlock_timeout``; then put REBUILD_LOCK_TIMEOUT back.

    An autovacuum of one of them (a table just loaded with millions of rows, or made live by
    the last swap) holds that lock for as long as it runs, throttled: minutes at 10 M rows.
    PostgreSQL cancels an autovacuum that blocks a lock request only once the request has
    waited ``deadlock_timeout`` (1 s by default), which the swap's own locks, waiting at most
    REBUILD_LOCK_TIMEOUT, never do: every attempt failed until the autovacuum ended. Readers
    and writers never wait on this lock (it conflicts only with VACUUM, ANALYZE, index builds
    and DDL), and once held no autovacuum starts on those tables until the swap ends.
    """
    deadlock_ms = float(
        await rconn.fetchval("SELECT setting FROM pg_settings WHERE name = 'deadlock_timeout'")
    )
    names = [f"{schema}.{table}" for schema in (live, SHADOW_SCHEMA) for table in _tables(models)]
    names += [
        f"{PREVIOUS_SCHEMA}.{table}"
        for table in _tables(models)
        if await rconn.fetchval("SELECT to_regclass($1)", f"{PREVIOUS_SCHEMA}.{table}")
    ]
    wait_ms = int(2 * deadlock_ms + settings.rebuild_lock_timeout * 1000)
    await rconn.execute(f"SET LOCAL lock_timeout = '{wait_ms}ms'")
    await rconn.execute(f"LOCK TABLE {', '.join(names)} IN SHARE UPDATE EXCLUSIVE MODE")
    await rconn.execute(f"SET LOCAL lock_timeout = '{int(settings.rebuild_lock_timeout * 1000)}ms'")


async def _swap_once(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    live: str,
    loaded: _Loaded,
    settings: Settings,
    version: int | None,
) -> int:
    await rconn.execute(f"SET LOCAL lock_timeout = '{int(settings.rebuild_lock_timeout * 1000)}ms'")
    # A sweep running meanwhile needs no exclusion: its election transaction, which lasts a
    # whole page, holds no lock on these tables, and each piece it applies is a projector
    # transaction like any other: it waits for the EXCLUSIVE lock below and then applies into
    # whichever version is live, where the ledger decides (the shadow holds every command of
    # the live ledger at the swap, so what the sweep found applied stays applied).
    tables = ", ".join(f"{live}.{table}" for table in _tables(loaded.models))
    await _outwait_autovacuum(rconn, live, loaded.models, settings)
    # EXCLUSIVE: writers (projectors, read-count flushes) wait, plain SELECTs go on.
    await rconn.execute(f"LOCK TABLE {tables} IN EXCLUSIVE MODE")
    writers_held = time.monotonic()
    applied = 0
    missing = await _missing_in_shadow(wconn, rconn, live, loaded)
    for page in await _pages(wconn, missing, settings.rebuild_batch_max_bytes):
        applied += await _apply_to_shadow(wconn, rconn, live, page, loaded.models)
    counted = time.monotonic()
    rows = await _copy_read_counts(rconn, live, loaded.read_counts_at, loaded.models)
    loaded.stats.update(
        swap_read_counts_s=round(time.monotonic() - counted, 3), swap_read_counts_rows=rows
    )
    # One previous version is kept: the one this swap replaces supersedes an older one.
    await _drop_previous_tables(rconn, loaded.models)
    # The only moment readers wait: the moves themselves, at most lock_timeout to get in.
    await rconn.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
    readers_held = time.monotonic()
    for table in _tables(loaded.models):
        await rconn.execute(f"ALTER TABLE {live}.{table} SET SCHEMA {PREVIOUS_SCHEMA}")
        await rconn.execute(f"ALTER TABLE {SHADOW_SCHEMA}.{table} SET SCHEMA {live}")
        # As the replaced table has them now (a GRANT queues behind no lock before this
        # one): what changed since the copy before the swap, usually nothing.
        await make_like(rconn, f"{PREVIOUS_SCHEMA}.{table}", f"{live}.{table}")
    moved = time.monotonic()
    await _record_versions(rconn, live, loaded.models, version, settings)
    loaded.stats.update(
        swap_commands=applied,
        swap_writers_held_s=round(moved - writers_held, 3),
        swap_readers_held_s=round(moved - readers_held, 3),
    )
    log.info(
        "rebuild swap: writers waited %.3fs, readers %.3fs; commands applied in the swap %d",
        moved - writers_held,
        moved - readers_held,
        applied,
    )
    return applied
