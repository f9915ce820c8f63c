"""The projector: consumes the stream in a consumer group and keeps the read model.

Each replica reads new entries and reclaims entries that a dead or stuck consumer left
pending, applies each batch in one read-DB transaction, and acknowledges after the commit.
Entries that can never be applied go to the dead-letter stream after
``PROJECTOR_MAX_DELIVERIES`` deliveries. Besides the stream, one replica at a time sweeps the
write DB for commands the stream never carried (Redis down, flushed or trimmed): the stream is
the fast path, the write DB the guarantee.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import events, stream, write_db
from .config import Settings
from .db import driver_connection, driver_of
from .metrics import DEAD_LETTERS, DUPLICATES_SKIPPED, EVENTS_PROJECTED, PROJECTION_BATCH_SECONDS
from .outages import is_refusal, sqlstate
from .projections import REQUIRED, Projection, apply_batch, enabled
from .projections.base import not_applied
from .projections.ledger import LedgerPruner
from .rebuild import drop_expired_previous
from .supervision import Backoff, RoundFailed, Supervisor, wait_or_stop
from .sweep import (
    AFTER_CURSOR,
    CLEAR_PENDING,
    ENSURE_STATES,
    LOAD_PENDING,
    LOAD_STATE,
    OF_TRANSACTION,
    SAVE_PENDING,
    SAVE_STATE,
    SNAPSHOT,
    SWEPT_MODELS,
    Candidate,
    Cursor,
    Snapshot,
    SweepState,
    advance,
    byte_pages,
    candidate,
    passed_open,
    settle_pending,
)

log = logging.getLogger(__name__)

# Arbitrary but fixed: only one replica sweeps the write DB at a time.
_CATCHUP_LOCK_KEY = 7_310_452_002
# Commands younger than this are left to the stream; the sweep looks at them next time.
CATCHUP_GRACE_SECONDS = 1.0

# Bounds the sweeper's own sessions (SET LOCAL, so they end with its transaction): a sweeper
# that stops answering is cut off by the server and its election lock released.
_BOUND_SESSION = text(
    "SELECT set_config('statement_timeout', :ms, true),"
    " set_config('idle_in_transaction_session_timeout', :ms, true),"
    " set_config('tcp_user_timeout', :ms, true)"
)
# The session holding the sweep election (advisory lock: key split in two 32-bit halves) whose
# state has not changed for the sweep timeout: ended, which releases the election.
_DEPOSE_STUCK = text(
    "WITH stuck AS MATERIALIZED ("
    " SELECT a.pid, now() - a.state_change AS unchanged FROM pg_locks l"
    " JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.classid::bigint = :high AND l.objid::bigint = :low"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND a.state_change < now() - make_interval(secs => :secs))"
    # MATERIALIZED: only the sessions found above are ever signalled.
    " SELECT pid, unchanged FROM stuck WHERE pg_terminate_backend(pid)"
)
# Keeps the election transaction from looking idle while the sweeper works elsewhere.
_STILL_HERE = text("SELECT 1")
# Stream fields besides key and value: type, position, created_at and their names.
_ENTRY_OVERHEAD_BYTES = 256


def default_consumer_name() -> str:
    """A consumer name unique to this process: host (the pod name in Kubernetes) and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Projector:
    """One projector replica; ``run`` until ``stopping`` is set, finishing its batch first."""

    def __init__(
        self,
        settings: Settings,
        write_engine: AsyncEngine,
        read_engine: AsyncEngine,
        read_pool: asyncpg.Pool,
        redis: Redis,
    ) -> None:
        self.settings = settings
        self.write_engine = write_engine
        self.read_engine = read_engine
        self.read_pool = read_pool
        self.redis = redis
        self.consumer = settings.consumer_name or default_consumer_name()
        # The read models this stack keeps: each batch is applied to all of them at once.
        self.projections = enabled(settings.read_model_names)
        self.pruner = LedgerPruner(
            write_engine, read_pool, self.projections, settings.ledger_prune_step
        )
        self._claim_every = max(0.05, min(settings.projector_claim_idle_ms / 2000, 5.0))
        self._next_claim = 0.0
        self._group_ready = False
        # Models another replica sweeps that this one does not keep (warned of once).
        self._other_models: tuple[str, ...] = ()
        self._redis_backoff = Backoff(maximum=settings.task_retry_max_delay)
        # The most a stream entry can weigh: a key of 255 characters, a value of MAX_VALUE_BYTES.
        self._largest_entry = settings.max_value_bytes + 4 * 255 + _ENTRY_OVERHEAD_BYTES

    def start(self, supervisor: Supervisor, stopping: asyncio.Event) -> None:
        """Project until ``stopping`` is set; Redis and database outages are waited out.

        The stream consumer and the write-DB sweep run as two supervised loops, so that a
        Redis that hangs or vanishes never holds back the sweep that covers for it, and a
        failure of either is retried and reported (supervision.py).
        """
        log.info(
            "projector started consumer=%s stream=%s group=%s",
            self.consumer,
            self.settings.event_stream_name,
            self.settings.consumer_group,
        )
        supervisor.run(
            "stream-consumer", lambda: self._consume_round(stopping), until=stopping, interval=0
        )
        # The stream is the fast path: the first sweep of the write DB comes one interval in.
        interval = self.settings.projector_catchup_interval
        supervisor.run(
            "catch-up-sweep",
            self._sweep_round,
            until=stopping,
            interval=interval,
            first_after=interval,
        )
        supervisor.run(
            "ledger-pruner",
            self._prune_round,
            until=stopping,
            interval=self.settings.ledger_prune_interval,
            first_after=self.settings.ledger_prune_interval,
            essential=False,  # projection goes on without it; the ledger only grows meanwhile
        )

    async def _prune_round(self) -> float | None:
        await self.pruner.prune_round()
        # Housekeeping of the same cadence: a rebuild's previous version past its keeping.
        async with self.read_pool.acquire() as conn:
            await drop_expired_previous(conn, self.settings)
        return 0 if self.pruner.behind else None  # a backlog: on at once, from the same fence

    async def _sweep_round(self) -> None:
        applied = await self.catch_up()
        if applied:
            log.info("catch-up applied commands the stream did not deliver count=%d", applied)

    async def _consume_round(self, stopping: asyncio.Event) -> float:
        """Claim (when due), read and project one batch; return the delay before the next.

        A Redis failure raises ``RoundFailed`` with the back-off, so that /ready reports it.
        """
        try:
            if not self._group_ready:
                await stream.ensure_group(
                    self.redis, self.settings.event_stream_name, self.settings.consumer_group
                )
                self._group_ready = True
            now = time.monotonic()
            if now >= self._next_claim:
                self._next_claim = now + self._claim_every
                await self.project_entries(await self._claim(), stopping)
            await self.project_entries(await self._read_batch(), stopping)
        except ResponseError as exc:
            self._group_ready = False
            if "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc):
                # Redis was flushed or the stream deleted (Redis 7 unblocks a waiting
                # XREADGROUP with UNBLOCKED): recreate; the sweep covers the gap.
                log.warning(
                    "consumer group missing, recreating stream=%s",
                    self.settings.event_stream_name,
                )
                return 0
            delay = self._redis_backoff.next_delay()
            log.error("redis refused a command, retrying in %.1fs error=%s", delay, exc)
            raise RoundFailed(exc, delay) from exc  # on /ready until a round succeeds
        except (RedisError, OSError) as exc:
            # A timed-out connection may hold a half-read reply: start afresh.
            self._group_ready = False
            delay = self._redis_backoff.next_delay()
            log.warning("redis unavailable, retrying in %.1fs error=%s", delay, exc)
            raise RoundFailed(exc, delay) from exc
        self._redis_backoff.reset()
        return 0

    async def _claim(self) -> list[stream.Entry]:
        return await stream.claim_idle(
            self.redis,
            self.settings.event_stream_name,
            self.settings.consumer_group,
            self.consumer,
            self.settings.projector_claim_idle_ms,
            self._fitting(self.settings.projector_batch_size, 0),
        )

    async def _read_batch(self) -> list[stream.Entry]:
        """Read up to PROJECTOR_BATCH_SIZE new entries and at most PROJECTOR_BATCH_MAX_BYTES.

        Redis cannot read by size, so each read asks for only as many entries as would fit
        the budget left if every one were as large as an entry can be, and reads again
        (without blocking) while the entries turn out smaller: a batch of small entries
        takes a few round trips, and no mix of sizes ever holds more than the budget.
        """
        batch: list[stream.Entry] = []
        used = 0
        while True:
            count = self._fitting(self.settings.projector_batch_size - len(batch), used)
            if count < 1:
                return batch
            entries = await stream.read_new(
                self.redis,
                self.settings.event_stream_name,
                self.settings.consumer_group,
                self.consumer,
                count,
                None if batch else int(self.settings.projector_poll_interval * 1000),
            )
            batch += entries
            used += sum(_entry_bytes(entry) for entry in entries)
            if len(entries) < count:
                return batch  # nothing more waiting

    def _fitting(self, wanted: int, used: int) -> int:
        """How many of ``wanted`` entries surely fit the byte budget once ``used`` is held.

        At least one when nothing is held: an entry larger than the budget goes alone.
        """
        fit = (self.settings.projector_batch_max_bytes - used) // self._largest_entry
        return min(wanted, fit if used else max(fit, 1))

    async def project_entries(
        self, entries: Sequence[stream.Entry], stopping: asyncio.Event
    ) -> None:
        """Apply stream entries, acknowledge them, and dead-letter poison ones.

        The entries are applied in pieces of at most PROJECTOR_BATCH_MAX_BYTES, each in its
        own transaction, so that no mix of value sizes makes a statement too large.
        """
        if not entries:
            return
        sizes = [_entry_bytes(entry) for entry in entries]
        for page in byte_pages(entries, sizes, self.settings.projector_batch_max_bytes):
            await self._project_page(page, stopping)

    async def _project_page(self, entries: Sequence[stream.Entry], stopping: asyncio.Event) -> None:
        good: list[tuple[stream.Entry, events.Command]] = []
        for entry in entries:
            try:
                good.append((entry, events.decode(entry.fields)))
            except events.MalformedEvent as exc:
                await self._reject(entry, str(exc))
        if not good:
            return
        commands = [command for _, command in good]
        if await self._apply_with_retry(commands, stopping):
            await stream.acknowledge(
                self.redis,
                self.settings.event_stream_name,
                self.settings.consumer_group,
                [entry.entry_id for entry, _ in good],
            )
            return
        # The batch as a whole was refused by the database: find the culprits one by one.
        for entry, command in good:
            if await self._apply_with_retry([command], stopping):
                await stream.acknowledge(
                    self.redis,
                    self.settings.event_stream_name,
                    self.settings.consumer_group,
                    [entry.entry_id],
                )
            else:
                await self._reject(entry, "read DB refused the command")

    async def _reject(self, entry: stream.Entry, reason: str) -> None:
        """Leave a bad entry pending for redelivery, or dead-letter it once it used its tries."""
        if entry.deliveries >= self.settings.projector_max_deliveries:
            await stream.dead_letter(self.redis, self.settings, entry, reason, self.consumer)
            DEAD_LETTERS.inc()
        else:
            log.warning(
                "event refused entry=%s deliveries=%d reason=%s",
                entry.entry_id,
                entry.deliveries,
                reason[:200],
            )

    async def _apply_with_retry(
        self, commands: Sequence[events.Command], stopping: asyncio.Event
    ) -> bool:
        """Apply in one transaction; wait out database outages; False if the data is refused.

        Only a refusal of the entries themselves (outages.is_refusal) returns False, so only
        that counts towards the dead letter; any other failure is retried with back-off.
        """
        backoff = Backoff(maximum=self.settings.task_retry_max_delay)
        while True:
            try:
                await self.apply(commands, source="stream")
                return True
            except (DBAPIError, OSError) as exc:
                cause = getattr(exc, "orig", None) or exc
                if is_refusal(exc):
                    log.error("read DB refused a batch size=%d error=%s", len(commands), cause)
                    return False
                if stopping.is_set():
                    raise
                delay = backoff.next_delay()
                log.warning(
                    "read DB unavailable, retrying in %.1fs sqlstate=%s error=%s",
                    delay,
                    sqlstate(exc),
                    cause,
                )
                await wait_or_stop(stopping, delay)

    async def apply(
        self,
        commands: Sequence[events.Command],
        source: str,
        models: Sequence[type[Projection]] | None = None,
    ) -> int:
        """Apply commands to every read model (or to ``models``) in one read-DB transaction;
        return how many were new to the first of them (``records`` unless ``models`` lacks
        it: then progress and the projection metrics are not counted, they count records)."""
        chosen = tuple(models) if models is not None else self.projections
        counted = chosen[0].name == REQUIRED
        started = time.perf_counter()
        async with driver_connection(self.read_pool) as conn:
            counts = await apply_batch(conn, chosen, commands, self.consumer if counted else None)
        applied = counts[chosen[0].name]
        if counted:
            PROJECTION_BATCH_SECONDS.observe(time.perf_counter() - started)
            EVENTS_PROJECTED.labels(source).inc(applied)
            DUPLICATES_SKIPPED.inc(len(commands) - applied)
        return applied

    async def catch_up(self) -> int:
        """Apply committed commands that a read model lacks; return how many were applied.

        One replica at a time (an advisory lock in the read DB, held by a transaction whose
        statements and idle time the server bounds) reads, for each model it keeps, one page
        of the write DB from that model's stored cursor (module ``sweep``; models at the same
        cursor share the page), fetches the missing commands' values in pieces of at
        most PROJECTOR_BATCH_MAX_BYTES, applies each piece in its own transaction (the ledger
        makes a repeat harmless) to the models lacking them, then moves their cursors. A replica
        keeping fewer models moves only their cursors, so one that keeps a model finds every
        command of it that the others acknowledged from the stream without applying.

        The election transaction touches only the sweep's own state, never the projection's
        tables: it lasts a whole page (up to PROJECTOR_SWEEP_TIMEOUT), and a lock it held on
        them would keep a rebuild's swap out for as long. The ledger is looked up, and each
        piece applied, in short transactions of their own.
        """
        page_limit = max(50_000, 4 * self.settings.write_batch_max)
        applied = 0
        async with self.read_engine.begin() as rconn:
            await self._bound_session(rconn)
            if not await rconn.scalar(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _CATCHUP_LOCK_KEY}
            ):
                await self._depose_stuck_sweeper(rconn)
                return 0  # another replica is sweeping
            names = [p.name for p in self.projections]
            await rconn.execute(ENSURE_STATES, {"models": names})
            self._warn_of_other_models(await rconn.scalar(SWEPT_MODELS) or [])
            # Models at the same position share one scan; one behind (kept by fewer replicas
            # until now) is swept from its own position, so it gets what it lacks.
            groups: list[tuple[SweepState, list[type[Projection]]]] = []
            for projection in self.projections:
                state = await _load_state(rconn, projection.name)
                for known, models in groups:
                    if known == state:
                        models.append(projection)
                        break
                else:
                    groups.append((state, [projection]))
            async with self.write_engine.connect() as wconn:
                await wconn.execution_options(isolation_level="REPEATABLE READ")
                for state, models in groups:
                    found, state = await self._scan(wconn, state, page_limit)
                    missing = await self._missing(models, [c for c in found if c.settled])
                    applied += await self._apply_missing(rconn, wconn, models, missing)
                    for projection in models:
                        await _save_state(rconn, projection.name, state)
        return applied

    def _warn_of_other_models(self, swept: Sequence[str]) -> None:
        """Warn (once per change) of models another replica keeps and this one does not."""
        others = tuple(sorted(set(swept) - {p.name for p in self.projections}))
        if others and others != self._other_models:
            log.warning(
                "read models kept by another replica are not enabled here models=%s"
                " READ_MODELS=%s: every replica should share READ_MODELS; the sweep of a"
                " replica that keeps them applies what this one acknowledges",
                ",".join(others),
                ",".join(p.name for p in self.projections),
            )
        self._other_models = others

    async def _depose_stuck_sweeper(self, rconn: AsyncConnection) -> None:
        """End the session of a sweeper that has not moved for PROJECTOR_SWEEP_TIMEOUT.

        A live sweeper's statements and idle spells each last at most half of it (the server
        cuts them off), so a holder whose session state is older than that is stopped, frozen
        or cut off in the middle of the protocol, where the server's own timeouts do not
        reach (e.g. between Parse and Sync). Needs the holder's role (the replicas share one).
        """
        try:
            async with rconn.begin_nested():
                deposed = (
                    await rconn.execute(
                        _DEPOSE_STUCK,
                        {
                            "high": _CATCHUP_LOCK_KEY >> 32,
                            "low": _CATCHUP_LOCK_KEY & 0xFFFFFFFF,
                            "secs": self.settings.projector_sweep_timeout,
                        },
                    )
                ).all()
        except DBAPIError as exc:
            log.warning("cannot end a stuck sweeper's session error=%s", exc.orig)
            return
        for pid, idle in deposed:
            log.warning("ended a stuck sweeper's session pid=%s unchanged_for=%s", pid, idle)

    async def _bound_session(self, conn: AsyncConnection) -> None:
        half_ms = str(int(self.settings.projector_sweep_timeout * 500))
        await conn.execute(_BOUND_SESSION, {"ms": half_ms})

    async def _scan(
        self, wconn: AsyncConnection, state: SweepState, limit: int
    ) -> tuple[list[Candidate], SweepState]:
        """One page of candidates, in one snapshot: ended pending transactions first."""
        found: list[Candidate] = []
        pending = dict(state.pending)
        async with wconn.begin():
            await self._bound_session(wconn)  # also takes the snapshot (REPEATABLE READ)
            xmin, xmax, xip = (await wconn.execute(SNAPSHOT)).one()
            snapshot = Snapshot(int(xmin), int(xmax), frozenset(int(x) for x in xip))
            for txid, after_id in sorted(state.pending.items()):
                room = limit - len(found)
                if room <= 0:
                    break
                if not snapshot.ended(txid):
                    continue
                page = await _candidates(
                    wconn, OF_TRANSACTION, txid=txid, position=after_id, limit=room
                )
                found += page
                settled_to = settle_pending(after_id, page, room)
                if settled_to is None:
                    del pending[txid]
                else:
                    pending[txid] = settled_to
            cursor = state.cursor
            room = limit - len(found)
            if room > 0:
                page = await _candidates(
                    wconn,
                    AFTER_CURSOR,
                    txid=cursor.txid,
                    position=cursor.position,
                    limit=room,
                )
                found += page
                cursor = advance(cursor, page)
            for txid in passed_open(snapshot, cursor):
                pending.setdefault(txid, 0)
        return found, SweepState(cursor, pending)

    async def _missing(
        self, models: Sequence[type[Projection]], settled: Sequence[Candidate]
    ) -> list[Candidate]:
        """The candidates that one of ``models`` lacks (in a transaction of its own)."""
        if not settled:
            return []
        by_position = {c.position: c for c in settled}
        async with self.read_engine.begin() as conn:
            await self._bound_session(conn)
            lacking = await not_applied(await driver_of(conn), models, list(by_position))
            return [by_position[p] for p in lacking]

    async def _apply_missing(
        self,
        rconn: AsyncConnection,
        wconn: AsyncConnection,
        models: Sequence[type[Projection]],
        missing: Sequence[Candidate],
    ) -> int:
        """Fetch and apply the missing commands, at most PROJECTOR_BATCH_MAX_BYTES at a time."""
        applied = 0
        budget = self.settings.projector_batch_max_bytes
        for page in byte_pages(missing, [c.size for c in missing], budget):
            await rconn.execute(_STILL_HERE)
            async with wconn.begin():
                await self._bound_session(wconn)
                commands = await write_db.commands_on(wconn, [c.position for c in page])
            await rconn.execute(_STILL_HERE)
            applied += await self.apply(commands, source="catch-up", models=models)
            del commands  # the next page's values are fetched only once these are freed
        return applied


async def _candidates(
    wconn: AsyncConnection, query: TextClause, **params: object
) -> list[Candidate]:
    rows = await wconn.execute(query, {"grace": CATCHUP_GRACE_SECONDS, **params})
    return [candidate(row) for row in rows]


async def _load_state(rconn: AsyncConnection, model: str) -> SweepState:
    txid, position = (await rconn.execute(LOAD_STATE, {"model": model})).one()
    pending = {int(t): int(a) for t, a in await rconn.execute(LOAD_PENDING, {"model": model})}
    return SweepState(Cursor(int(txid), int(position)), pending)


async def _save_state(rconn: AsyncConnection, model: str, state: SweepState) -> None:
    await rconn.execute(
        SAVE_STATE,
        {
            "model": model,
            "txid": state.cursor.txid,
            "position": state.cursor.position,
            "watermark": state.watermark,
        },
    )
    await rconn.execute(CLEAR_PENDING, {"model": model})
    if state.pending:
        txids = sorted(state.pending)
        await rconn.execute(
            SAVE_PENDING,
            {
                "model": model,
                "txids": [str(t) for t in txids],
                "afters": [state.pending[t] for t in txids],
            },
        )


def _entry_bytes(entry: stream.Entry) -> int:
    """What an entry weighs in memory and in a statement: its field names and values."""
    return sum(len(k) + len(v) for k, v in entry.fields.items())
