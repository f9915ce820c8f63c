"""Accepting commands: group commit into the write DB, then publishing their events.

Guarantee 1 lives here and in the projector's catch-up. A command is acknowledged only after
its transaction commits; its event is then published in one Redis round trip for the whole
batch (``stream.publish``), while the next batch commits. If Redis is down or hung, the
command stays marked unpublished and ``publish_pending`` sends it once Redis is back; a crash
between commit and XADD leaves the same trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import stream, write_db
from .breaker import CircuitBreaker
from .config import Settings
from .errors import IdempotencyKeyReused, RequestRefused, RetryLater
from .events import Command
from .metrics import EVENTS_PUBLISHED, PUBLISH_FAILURES, WRITE_BATCH_SIZE, WRITE_QUEUE_DEPTH
from .supervision import Supervisor
from .write_db import Busy, CommitOutcomeUnknown, NewCommand, Outcome, Precondition

if TYPE_CHECKING:  # imported only with TRACING on (tracing.py loads OpenTelemetry)
    from opentelemetry.context import Context

    from .tracing import Stage, Tracing

log = logging.getLogger(__name__)

# How often an idle batching loop wakes to see whether the process is stopping.
_IDLE_WAKE = 0.5
_LOOP_NAME = "command-writer"
# A write whose key another transaction holds goes back in the queue after this long (or its
# bound, WRITE_KEY_BUSY_TIMEOUT, whichever is sooner).
_BUSY_RETRY_DELAY = 0.05


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write request learns: the stored command and its stream id (None: queued)."""

    command: Command
    event_id: str | None
    # The key's version after this command; None for a plain write (not looked up) and after
    # a lost connection (not known).
    version: int | None = None
    # Stored by an earlier write with the same Idempotency-Key: this answer is its answer.
    replayed: bool = False
    # False: a replay whose original answer (event_id) is not recorded yet.
    settled: bool = True


@dataclass(slots=True)
class _Pending:
    item: NewCommand
    done: asyncio.Future[WriteResult]
    # When a batch first found its key held by another transaction (loop time), if it did.
    busy_since: float | None = None
    # The request's trace context (TRACING on), parent of its commit and publish spans.
    trace: Context | None = None


class CommandWriter:
    """Batches concurrent writes: one transaction and one publishing round trip per batch.

    Under load, requests that arrive while a batch is committing form the next batch, so
    throughput grows with concurrency while a lone request still commits at once. A batch
    whose XADD succeeded is marked published before it is answered (one more statement that
    does not wait for its WAL flush; a lost mark only means a harmless duplicate publish).

    Redis is waited on at most ``redis_timeout`` per batch, and not at all while the circuit
    breaker is open (after a failure, until a background probe gets an answer): the batch is
    then answered queued and ``publish_pending`` sends its events later. At most
    ``write_queue_max`` writes are in hand (queued or in the batch committing); one more is
    refused with ``RetryLater`` (503, Retry-After).
    """

    def __init__(
        self, pool: asyncpg.Pool, redis: Redis, settings: Settings, tracing: Tracing | None = None
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._settings = settings
        self._tracing = tracing
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._supervisor: Supervisor | None = None
        self._closed = asyncio.Event()
        # Writes put in the queue and not yet through their batch. Counted, not derived from
        # qsize(): a write the loop has taken but not yet put in a batch is still in hand.
        self._in_hand = 0
        self._batch: list[_Pending] = []  # the batch committing (its statement may be sent)
        # The committed batch whose events are being published, and the task doing it.
        self._answering: list[tuple[_Pending, Command]] = []
        self._publishing: asyncio.Task[None] | None = None
        self._give_up: asyncio.TimerHandle | None = None  # set once a stop has begun
        # Writes whose key another transaction held, waiting to go back in the queue.
        self._held: list[tuple[_Pending, asyncio.TimerHandle]] = []
        self._refusing = False  # the stop's bound passed: writes are answered at once
        # Read when /metrics is scraped: a gauge set on every write took a lock each time.
        WRITE_QUEUE_DEPTH.set_function(lambda: self.in_hand)
        self._breaker = CircuitBreaker(
            "redis",
            redis.ping,
            probe_timeout=settings.redis_timeout,
            probe_interval=settings.redis_probe_interval,
        )

    def start(self, supervisor: Supervisor) -> None:
        """Start the batching loop under ``supervisor`` (inside the running event loop)."""
        self._supervisor = supervisor
        supervisor.run(_LOOP_NAME, self._write_round, until=self._closed, interval=0)

    def begin_stop(self, within: float) -> None:
        """The process is stopping: writes not answered within ``within`` seconds are then
        answered 503 (``outcome_unknown`` when their batch was committing, else
        ``shutting_down``, nothing stored), and later writes at once. Idempotent."""
        if self._give_up is None:
            self._give_up = asyncio.get_running_loop().call_later(within, self._answer_all)

    def _answer_all(self) -> None:
        """The stop's bound passed: answer every write in hand; none waits for the write DB."""
        self._refusing = True
        self._answer_queued()  # committed: stored, its events sent by the publisher later
        for pending, handle in self._held:  # nothing stored
            handle.cancel()
            if not pending.done.done():
                pending.done.set_exception(_stopping())
            self._in_hand -= 1
        self._held = []
        for pending in self._batch:  # its statement may be sent: it may be stored
            if not pending.done.done():
                pending.done.set_exception(CommitOutcomeUnknown())
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.done.done():
                pending.done.set_exception(_stopping())
            self._in_hand -= 1
            self._queue.task_done()

    async def stop(self, within: float) -> None:
        """Finish what was queued within ``within`` seconds, answer the rest, then stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        self.begin_stop(within)
        if self._supervisor is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._queue.join()
            self._answer_all()
            self._closed.set()
            await self._supervisor.stop([_LOOP_NAME], max(0.0, deadline - loop.time()))
        if self._publishing is not None:  # answered already if the bound passed
            await asyncio.wait([self._publishing], timeout=max(0.0, deadline - loop.time()))
        await self._breaker.close()

    @property
    def in_hand(self) -> int:
        """Writes accepted and not answered yet (queued or in the batch committing)."""
        return self._in_hand

    async def write(
        self,
        key: str,
        value: str,
        event_type: str,
        *,
        idempotency_key: str | None = None,
        digest: bytes = b"",
        precondition: Precondition | None = None,
    ) -> WriteResult:
        """Store one command; return once it is committed (and published, if Redis is up).

        With ``idempotency_key`` (and the ``digest`` of the write), a write that used it
        before is answered instead (``replayed``), or refused (``IdempotencyKeyReused``) if
        its digest differs; with ``precondition``, ``PreconditionFailed`` unless the key's
        version satisfies it. Raises ``RetryLater`` at once, storing nothing, when
        ``write_queue_max`` writes are already in hand, or once a stop has answered the
        writes in hand.
        """
        if self._refusing:
            raise _stopping()
        if self.in_hand >= self._settings.write_queue_max:
            raise RetryLater(
                "write_queue_full",
                f"{self._settings.write_queue_max} writes are waiting for the write DB "
                "(WRITE_QUEUE_MAX); nothing was stored, retry later",
            )
        done: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        item = NewCommand(key, value, event_type, idempotency_key, digest, precondition)
        trace = None if self._tracing is None else self._tracing.current()
        self._queue.put_nowait(_Pending(item, done, trace=trace))
        self._in_hand += 1
        return await done

    async def _write_round(self) -> None:
        """Commit one batch and hand it to publishing; an idle round just returns.

        The batch's XADD and answers run while the next batch commits (at most one batch
        publishes while one commits), so a batch's fsync wait overlaps the previous batch's
        publishing. Batches publish in commit order, one after the other.
        """
        if self._queue.empty():
            try:
                # Bounded, so that the loop sees ``_closed`` while no request comes.
                async with asyncio.timeout(_IDLE_WAKE):  # no task per idle wait
                    first = await self._queue.get()
            except TimeoutError:
                return
        else:
            first = self._queue.get_nowait()
        batch = [first]
        while len(batch) < self._settings.write_batch_max and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        self._batch = batch
        group, retries = _first_of_each_key(batch)
        try:
            outcomes = await self._commit(batch, group)
        except Exception as exc:  # unforeseen: the batch's writers learn of it, never hang
            _fail(batch, exc)
            self._release(batch)
            raise
        finally:
            self._batch = []
        if outcomes is None:
            self._release(batch)
            return
        if len(outcomes) != len(group):  # the statement returned another count: the loop's error
            miscount = RuntimeError(f"{len(outcomes)} outcomes for {len(group)} writes")
            _fail(batch, miscount)
            self._release(batch)
            raise miscount
        if self._publishing is not None:
            await asyncio.wait([self._publishing])  # its own errors are its writers' answers
        self._publishing = asyncio.create_task(
            self._publish_and_answer(batch, group, retries, outcomes)
        )

    def _release(self, batch: list[_Pending]) -> None:
        """The batch is answered: it is no longer in hand."""
        self._in_hand -= len(batch)
        for _ in batch:
            self._queue.task_done()

    async def _commit(self, batch: list[_Pending], group: list[_Pending]) -> list[Outcome] | None:
        """The outcome of each write of ``group`` (the batch without its repeated keys),
        committed; None when the write DB failed (the batch's writers told)."""
        WRITE_BATCH_SIZE.observe(len(batch))
        spans = (
            None if self._tracing is None else self._tracing.committing([p.trace for p in batch])
        )
        try:
            outcomes = await write_db.store_commands(
                self._pool,
                [p.item for p in group],
                write_db.new_batch_token(),
                self._settings.write_outcome_timeout,
                self._settings.idempotency_retention,
            )
        except Exception as exc:  # every waiter must learn of the failure
            if spans is not None:
                spans.end(exc)
            _fail(batch, exc)
            return None
        if spans is not None:
            spans.end()
        return outcomes

    async def _publish_and_answer(
        self,
        batch: list[_Pending],
        group: list[_Pending],
        retries: list[tuple[_Pending, int]],
        outcomes: list[Outcome],
    ) -> None:
        """Publish a committed batch's new events, then answer its writers (refusals and
        replays need no publishing; a later write of a key in the batch gets its answer if
        that write was stored, else is settled anew; a write whose key was busy is held)."""
        fresh = [
            (pending, outcome.command)
            for pending, outcome in zip(group, outcomes, strict=True)
            if isinstance(outcome, write_db.Stored) and not outcome.replayed
        ]
        self._answering = fresh
        try:
            event_ids = await self._publish(fresh)
            answers: list[WriteResult | RequestRefused | Busy] = []
            published = iter(event_ids)
            for outcome in outcomes:
                if isinstance(outcome, RequestRefused | Busy):
                    answers.append(outcome)
                elif outcome.replayed:
                    answers.append(
                        WriteResult(
                            outcome.command,
                            outcome.event_id,
                            outcome.version,
                            replayed=True,
                            settled=outcome.settled,
                        )
                    )
                else:
                    answers.append(WriteResult(outcome.command, next(published), outcome.version))
            await self._record_event_ids(group, answers)
            for pending, answer in zip(group, answers, strict=True):
                if isinstance(answer, Busy):
                    self._hold(pending)
                else:
                    _settle(pending, answer)
            for pending, first in retries:
                answer = answers[first]
                if isinstance(answer, WriteResult):
                    _settle(pending, _retry_answer(pending, group[first], answer))
                else:  # a refused or busy write claims nothing: the write DB must settle it
                    self._requeue(pending)
        except Exception as exc:  # unforeseen: committed, so answered queued; logged, not raised
            log.exception("publishing a committed batch failed count=%d", len(batch))
            self._answer_queued()
            _fail(batch, exc)  # any not answered yet
        finally:
            self._answering = []
            self._release(batch)

    def _answer_queued(self) -> None:
        """Answer the batch publishing as committed and queued (the publisher sends later)."""
        for pending, command in self._answering:
            if not pending.done.done():
                pending.done.set_result(WriteResult(command, None))

    def _requeue(self, pending: _Pending) -> None:
        """Queue a write of this batch again, for the next one."""
        if self._refusing:
            if not pending.done.done():
                pending.done.set_exception(_stopping())
            return
        self._queue.put_nowait(pending)
        self._in_hand += 1

    def _hold(self, pending: _Pending) -> None:
        """A write whose key another transaction holds: back in the queue shortly, unless it
        has been busy for WRITE_KEY_BUSY_TIMEOUT (then 503 key_busy, nothing stored)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if pending.busy_since is None:
            pending.busy_since = now
        left = self._settings.write_key_busy_timeout - (now - pending.busy_since)
        if self._refusing or left <= 0:
            if not pending.done.done():
                pending.done.set_exception(_stopping() if self._refusing else self._key_busy())
            return
        self._in_hand += 1  # still in hand while it waits
        handle = loop.call_later(min(_BUSY_RETRY_DELAY, left), self._unhold, pending)
        self._held.append((pending, handle))

    def _unhold(self, pending: _Pending) -> None:
        self._held = [(p, h) for p, h in self._held if p is not pending]
        self._in_hand -= 1
        self._requeue(pending)

    def _key_busy(self) -> RetryLater:
        # The holder is a session the write DB ends within WRITE_IDLE_TRANSACTION_TIMEOUT.
        return RetryLater(
            "key_busy",
            "another transaction has held this key (or Idempotency-Key) for "
            f"{self._settings.write_key_busy_timeout:g} s (WRITE_KEY_BUSY_TIMEOUT): "
            "nothing was stored, retry later",
            retry_after=max(1, math.ceil(self._settings.write_idle_transaction_timeout)),
        )

    async def _record_event_ids(
        self, group: list[_Pending], answers: list[WriteResult | RequestRefused | Busy]
    ) -> None:
        """Keep the answers of the group's new keyed commands for their replays: the stream
        id, or '' for a command answered queued."""
        keyed = [
            (pending.item.idempotency_key, answer.event_id or "")
            for pending, answer in zip(group, answers, strict=True)
            if pending.item.idempotency_key is not None
            and isinstance(answer, WriteResult)
            and not answer.replayed
        ]
        if not keyed:
            return
        try:
            await write_db.record_event_ids(self._pool, keyed)  # type: ignore[arg-type]
        except Exception as exc:  # the answer stands; a replay will say queued
            log.warning("recording event ids failed count=%d error=%r", len(keyed), exc)

    async def _publish(self, fresh: list[tuple[_Pending, Command]]) -> list[str | None]:
        """XADD the batch's events and mark them published; all None when they stay queued."""
        commands = [command for _, command in fresh]
        if not commands:
            return []
        if not self._breaker.allows():
            return [None] * len(commands)
        spans: Stage | None = None
        traceparents: list[str] | None = None
        if self._tracing is not None:
            name = self._settings.event_stream_name
            spans = self._tracing.publishing([p.trace for p, _ in fresh], name)
            traceparents = spans.traceparents()
        try:
            # A timeout in this task, not wait_for's task per batch.
            async with asyncio.timeout(self._settings.redis_timeout):
                event_ids: list[str | None] = list(
                    await stream.publish(
                        self._redis,
                        self._settings.event_stream_name,
                        commands,
                        self._settings.stream_max_length,
                        traceparents,
                    )
                )
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            if spans is not None:
                spans.end(exc)
            self._breaker.failed(exc)
            PUBLISH_FAILURES.inc()
            log.warning("publish failed, events queued count=%d error=%r", len(commands), exc)
            return [None] * len(commands)
        except BaseException as exc:  # cancelled, or unforeseen: the spans still end
            if spans is not None:
                spans.end(exc)
            raise
        self._breaker.succeeded()
        if spans is not None:
            spans.end()
        EVENTS_PUBLISHED.inc(len(commands))
        try:
            await write_db.mark_published_now(self._pool, [c.position for c in commands])
        except Exception as exc:  # the events are in the stream: the answer stands
            log.warning("marking published failed count=%d error=%r", len(commands), exc)
        return event_ids


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for pending in batch:
        if not pending.done.done():
            pending.done.set_exception(exc)


def _first_of_each_key(batch: list[_Pending]) -> tuple[list[_Pending], list[tuple[_Pending, int]]]:
    """The writes to store, and the retries: a later write of a batch with an Idempotency-Key
    already in it, with the index in the first list of the write it repeats."""
    if all(p.item.idempotency_key is None for p in batch):
        return batch, []
    group: list[_Pending] = []
    retries: list[tuple[_Pending, int]] = []
    first: dict[str, int] = {}
    for pending in batch:
        key = pending.item.idempotency_key
        if key is not None and key in first:
            retries.append((pending, first[key]))
            continue
        if key is not None:
            first[key] = len(group)
        group.append(pending)
    return group, retries


def _retry_answer(
    retry: _Pending, first: _Pending, answer: WriteResult
) -> WriteResult | RequestRefused:
    """The answer to a later write of a batch with the Idempotency-Key of an earlier one that
    was stored: that write's answer, or 422 for another digest."""
    if retry.item.digest != first.item.digest:
        return IdempotencyKeyReused()
    return dataclasses.replace(answer, replayed=True)


def _settle(pending: _Pending, answer: WriteResult | RequestRefused) -> None:
    if pending.done.done():
        return
    if isinstance(answer, RequestRefused):
        pending.done.set_exception(answer)
    else:
        pending.done.set_result(answer)


def _stopping() -> RetryLater:
    return RetryLater(
        "shutting_down",
        "this process is stopping and the write DB did not take the write in time: "
        "nothing was stored, retry later (another replica may take it)",
    )


async def publish_pending(
    engine: AsyncEngine, redis: Redis, settings: Settings, grace_seconds: float = 2.0
) -> int:
    """Publish one page of events of committed commands that never reached the stream; return
    how many (0: none left). A page holds at most ``write_batch_max * 4`` events and
    ``publisher_batch_max_bytes`` of keys and values (at least one event), so a backlog of
    large values is sent in pipelines of bounded size and memory.

    Rows stay locked until their events are in the stream and they are marked, so a crash in
    between leaves them unpublished (published again later, a harmless duplicate).
    """
    async with engine.begin() as conn:
        commands = await write_db.lock_unpublished(
            conn, settings.write_batch_max * 4, settings.publisher_batch_max_bytes, grace_seconds
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


# Batches of expired idempotency keys removed per round at most: a round stays short, and a
# backlog is removed over the next rounds.
_EXPIRY_BATCHES_PER_ROUND = 100


async def expire_idempotency_keys(pool: asyncpg.Pool, settings: Settings) -> float | None:
    """One supervised expiry round: remove idempotency keys past their expiry time (set at
    claim from the IDEMPOTENCY_RETENTION of the process that stored them), in batches of
    IDEMPOTENCY_EXPIRY_BATCH, each its own short transaction. Returns 0 (the
    next round at once) when the round stopped at its bound with keys left, else None."""
    removed = 0
    left = False
    for _ in range(_EXPIRY_BATCHES_PER_ROUND):
        count = await write_db.expire_idempotency_keys(pool, settings.idempotency_expiry_batch)
        removed += count
        left = count == settings.idempotency_expiry_batch
        if not left:
            break
    if removed:
        log.info("expired idempotency keys removed count=%d", removed)
    return 0.0 if left else None
