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
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import BigInteger, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import events, stream, write_db
from .config import Settings
from .db import driver_connection
from .metrics import DEAD_LETTERS, DUPLICATES_SKIPPED, EVENTS_PROJECTED, PROJECTION_BATCH_SECONDS
from .projection import apply_commands, apply_commands_alone
from .supervision import Backoff, Supervisor

log = logging.getLogger(__name__)

# Arbitrary but fixed: only one replica sweeps the write DB at a time.
_CATCHUP_LOCK_KEY = 7_310_452_002
# Commands younger than this are left to the stream; the sweep looks at them next time.
CATCHUP_GRACE_SECONDS = 1.0

_NOT_APPLIED = text(
    "SELECT p FROM unnest(:positions) AS p"
    " WHERE NOT EXISTS (SELECT 1 FROM applied_commands a WHERE a.command_id = p)"
).bindparams(bindparam("positions", type_=ARRAY(BigInteger)))


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
        self._claim_every = max(0.05, min(settings.projector_claim_idle_ms / 2000, 5.0))
        self._next_claim = 0.0
        self._group_ready = False
        self._redis_backoff = Backoff(maximum=settings.task_retry_max_delay)

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

    async def _sweep_round(self) -> None:
        applied = await self.catch_up()
        if applied:
            log.info("catch-up applied commands the stream did not deliver count=%d", applied)

    async def _consume_round(self, stopping: asyncio.Event) -> float:
        """Claim (when due), read and project one batch; return the delay before the next."""
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
            entries = await stream.read_new(
                self.redis,
                self.settings.event_stream_name,
                self.settings.consumer_group,
                self.consumer,
                self.settings.projector_batch_size,
                int(self.settings.projector_poll_interval * 1000),
            )
            await self.project_entries(entries, stopping)
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
            return delay
        except (RedisError, OSError) as exc:
            # A timed-out connection may hold a half-read reply: start afresh.
            self._group_ready = False
            delay = self._redis_backoff.next_delay()
            log.warning("redis unavailable, retrying in %.1fs error=%s", delay, exc)
            return delay
        self._redis_backoff.reset()
        return 0

    async def _claim(self) -> list[stream.Entry]:
        return await stream.claim_idle(
            self.redis,
            self.settings.event_stream_name,
            self.settings.consumer_group,
            self.consumer,
            self.settings.projector_claim_idle_ms,
            self.settings.projector_batch_size,
        )

    async def project_entries(
        self, entries: Sequence[stream.Entry], stopping: asyncio.Event
    ) -> None:
        """Apply a batch of stream entries, acknowledge them, and dead-letter poison ones."""
        if not entries:
            return
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
        """Apply in one transaction; wait out database outages; False if the data is refused."""
        backoff = 0.1
        while True:
            try:
                await self.apply(commands, source="stream")
                return True
            except OperationalError as exc:
                if stopping.is_set():
                    raise
                log.warning("read DB unavailable, retrying in %.1fs error=%s", backoff, exc.orig)
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    log.warning("read DB connection lost, retrying error=%s", exc.orig)
                elif _is_conflict(exc):
                    log.info("projection conflict, retrying error=%s", exc.orig)
                else:
                    log.error("read DB refused a batch size=%d error=%s", len(commands), exc.orig)
                    return False
            except OSError as exc:
                log.warning("read DB unreachable, retrying in %.1fs error=%s", backoff, exc)
            await _wait(stopping, backoff)
            backoff = min(backoff * 2, 5.0)

    async def apply(self, commands: Sequence[events.Command], source: str) -> int:
        """Apply commands in one read-DB transaction; return how many were new."""
        started = time.perf_counter()
        async with driver_connection(self.read_pool) as conn:
            applied = await apply_commands_alone(conn, commands, self.consumer)
        PROJECTION_BATCH_SECONDS.observe(time.perf_counter() - started)
        EVENTS_PROJECTED.labels(source).inc(applied)
        DUPLICATES_SKIPPED.inc(len(commands) - applied)
        return applied

    async def catch_up(self) -> int:
        """Apply committed commands that the read model lacks; return how many were applied.

        The watermark is a transaction id, not a command id: every write transaction older
        than the write DB snapshot's xmin has finished, so a command that commits late (its
        id drawn long before) is still found, and the sweep never skips a gap.
        """
        limit = max(50_000, 4 * self.settings.write_batch_max)
        async with self.read_engine.begin() as rconn:
            if not await rconn.scalar(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _CATCHUP_LOCK_KEY}
            ):
                return 0  # another replica is sweeping
            watermark = await rconn.scalar(
                text("SELECT watermark::text FROM projector_catchup FOR UPDATE")
            )
            async with self.write_engine.connect() as wconn:
                await wconn.execution_options(isolation_level="REPEATABLE READ")
                snapshot_xmin = await wconn.scalar(
                    text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                )
                rows = (
                    await wconn.execute(
                        text(
                            "SELECT id, txid::text, created_at < clock_timestamp()"
                            " - make_interval(secs => :grace) FROM commands"
                            " WHERE txid >= :watermark"
                            " ORDER BY txid, id LIMIT :limit"
                        ),
                        {
                            "watermark": int(watermark),
                            "grace": CATCHUP_GRACE_SECONDS,
                            "limit": limit,
                        },
                    )
                ).all()
                new_watermark = _next_watermark(rows, snapshot_xmin, limit)
                settled = [row[0] for row in rows if row[2]]
                missing = []
                if settled:
                    missing = list(
                        (await rconn.execute(_NOT_APPLIED, {"positions": settled})).scalars()
                    )
                commands = await write_db.commands_on(wconn, missing) if missing else []
                await wconn.rollback()
            applied = 0
            if commands:
                applied = await apply_commands(rconn, commands, self.consumer)
                EVENTS_PROJECTED.labels("catch-up").inc(applied)
            await rconn.execute(
                text("UPDATE projector_catchup SET watermark = :x, swept_at = now()"),
                {"x": new_watermark},
            )
        return applied


def _next_watermark(rows: Sequence[tuple[int, str, bool]], snapshot_xmin: str, limit: int) -> int:
    """The lowest transaction id the next sweep must look at again."""
    unsettled = [int(txid) for _, txid, settled in rows if not settled]
    candidates = [int(snapshot_xmin), *unsettled]
    if len(rows) >= limit:
        # A full page: resume at its last transaction (re-reading it is harmless).
        candidates.append(int(rows[-1][1]))
    return min(candidates)


def _is_conflict(exc: DBAPIError) -> bool:
    """Deadlocks and serialization failures between replicas: retrying is the answer."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code in ("40P01", "40001")


async def _wait(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
