"""Accepting commands: group commit into the write DB, then publishing their events.

Guarantee 1 lives here and in the projector's catch-up. A command is acknowledged only after
its transaction commits; its event is then published in one pipelined XADD for the whole
batch. If Redis is down, the command stays marked unpublished and ``publish_pending`` sends it
once Redis is back; a crash between commit and XADD leaves the same trace.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import stream, write_db
from .config import Settings
from .events import Command
from .metrics import EVENTS_PUBLISHED, PUBLISH_FAILURES, WRITE_BATCH_SIZE
from .supervision import Supervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write request learns: the stored command and its stream id (None: queued)."""

    command: Command
    event_id: str | None


@dataclass(slots=True)
class _Pending:
    key: str
    value: str
    event_type: str
    done: asyncio.Future[WriteResult]


# How long published marks may wait for the next batch's transaction before they are written
# in one of their own: far below the publisher's grace, so that they are never sent twice.
_MARK_DELAY = 0.2
# How often an idle batching loop wakes to see whether the process is stopping.
_IDLE_WAKE = 0.5
_LOOP_NAME = "command-writer"


class CommandWriter:
    """Batches concurrent writes: one transaction and one pipelined XADD per batch.

    Under load, requests that arrive while a batch is committing form the next batch, so
    throughput grows with concurrency while a lone request still commits at once. That a
    batch's events reached the stream is recorded in the next batch's transaction (or alone,
    after ``_MARK_DELAY`` without writes): a lost mark only means a harmless duplicate publish.
    """

    def __init__(self, pool: asyncpg.Pool, redis: Redis, settings: Settings) -> None:
        self._pool = pool
        self._redis = redis
        self._settings = settings
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._supervisor: Supervisor | None = None
        self._closed = asyncio.Event()
        self._published: list[int] = []  # in the stream, not yet marked in the write DB

    def start(self, supervisor: Supervisor) -> None:
        """Start the batching loop under ``supervisor`` (inside the running event loop)."""
        self._supervisor = supervisor
        supervisor.run(_LOOP_NAME, self._write_round, until=self._closed, interval=0)

    async def stop(self, within: float) -> None:
        """Finish what was queued, then stop (waiting at most ``within`` for the loop)."""
        if self._supervisor is not None:
            await self._queue.join()
            self._closed.set()
            await self._supervisor.stop([_LOOP_NAME], within)
        await self._mark_alone()

    async def write(self, key: str, value: str, event_type: str) -> WriteResult:
        """Store one command; return once it is committed (and published, if Redis is up)."""
        done: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(key, value, event_type, done))
        return await done

    async def _write_round(self) -> None:
        """Commit and publish one batch; an idle round writes pending marks or just returns."""
        if self._queue.empty():
            try:
                # Bounded, so that the loop sees ``_closed`` while no request comes.
                wait = _MARK_DELAY if self._published else _IDLE_WAKE
                first = await asyncio.wait_for(self._queue.get(), wait)
            except TimeoutError:
                await self._mark_alone()
                return
        else:
            first = self._queue.get_nowait()
        batch = [first]
        while len(batch) < self._settings.write_batch_max and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        try:
            await self._commit_and_publish(batch)
        except Exception as exc:  # unforeseen: the batch's writers learn of it, never hang
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
            raise
        finally:
            for _ in batch:
                self._queue.task_done()

    async def _commit_and_publish(self, batch: list[_Pending]) -> None:
        WRITE_BATCH_SIZE.observe(len(batch))
        marks, self._published = self._published, []
        try:
            commands = await write_db.insert_commands(
                self._pool, [(p.key, p.value, p.event_type) for p in batch], marks
            )
        except Exception as exc:  # every waiter must learn of the failure
            self._published[:0] = marks
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
            return
        event_ids: list[str | None] = [None] * len(commands)
        try:
            event_ids = list(
                await stream.publish(
                    self._redis,
                    self._settings.event_stream_name,
                    commands,
                    self._settings.stream_max_length,
                )
            )
        except (RedisError, OSError) as exc:
            PUBLISH_FAILURES.inc()
            log.warning("publish failed, events queued count=%d error=%s", len(commands), exc)
        else:
            EVENTS_PUBLISHED.inc(len(commands))
            self._published.extend(c.position for c in commands)
        for pending, command, event_id in zip(batch, commands, event_ids, strict=True):
            if not pending.done.done():
                pending.done.set_result(WriteResult(command, event_id))

    async def _mark_alone(self) -> None:
        marks, self._published = self._published, []
        if not marks:
            return
        try:
            await write_db.mark_published_now(self._pool, marks)
        except Exception as exc:
            log.warning("marking published failed count=%d error=%s", len(marks), exc)


async def publish_pending(
    engine: AsyncEngine, redis: Redis, settings: Settings, grace_seconds: float = 2.0
) -> int:
    """Publish events of committed commands that never reached the stream; return how many.

    Rows stay locked until their events are in the stream and they are marked, so a crash in
    between leaves them unpublished (published again later, a harmless duplicate).
    """
    async with engine.begin() as conn:
        commands = await write_db.lock_unpublished(
            conn, settings.write_batch_max * 4, grace_seconds
        )
        if not commands:
            return 0
        await stream.publish(
            redis, settings.event_stream_name, commands, settings.stream_max_length
        )
        await write_db.mark_published(conn, [c.position for c in commands])
    EVENTS_PUBLISHED.inc(len(commands))
    log.info("queued events published count=%d first=%d", len(commands), commands[0].position)
    return len(commands)


async def publish_queued(engine: AsyncEngine, redis: Redis, settings: Settings) -> None:
    """One publisher round: publish queued events until none is left; Redis down waits."""
    try:
        while await publish_pending(engine, redis, settings):
            pass
    except (RedisError, OSError) as exc:
        log.debug("publisher waiting for redis error=%s", exc)
