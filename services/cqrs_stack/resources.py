"""What a running process holds: its engines, its Redis client and its background tasks.

Created in the app's lifespan (no module-level connections); the role decides which parts
start: the write API batches and publishes, the read API counts reads, the projector projects.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import asyncpg
from fastapi import HTTPException
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db, stream
from .config import Settings
from .projector import Projector
from .read_db import ReadCounter, RecordReader
from .supervision import Supervisor
from .write_path import CommandWriter, expire_idempotency_keys, publish_queued

if TYPE_CHECKING:  # imported only with TRACING on (tracing.py loads OpenTelemetry)
    from .tracing import Tracing

log = logging.getLogger(__name__)

# Of SHUTDOWN_TIMEOUT, the share that writes in hand may still wait for the write DB; the rest
# is for sending their answers and for the background work's drain.
_ANSWER_SHARE = 0.75
# Disconnecting gets at least this long, even when the stop's time is used up.
_DISCONNECT_FLOOR = 0.5

Role = Literal["write-api", "read-api", "api", "projector"]
ROLES: tuple[Role, ...] = ("write-api", "read-api", "api", "projector")


def serves_writes(role: Role) -> bool:
    """Does a process of ``role`` serve /write?"""
    return role in ("write-api", "api")


def serves_reads(role: Role) -> bool:
    """Does a process of ``role`` serve /read?"""
    return role in ("read-api", "api")


@dataclass
class Resources:
    """Connections and background work of one process."""

    settings: Settings
    role: Role
    write_engine: AsyncEngine
    read_engine: AsyncEngine
    write_pool: asyncpg.Pool
    read_pool: asyncpg.Pool
    redis: Redis
    writer: CommandWriter | None = None
    read_counter: ReadCounter | None = None
    records: RecordReader | None = None
    projector: Projector | None = None
    tracing: Tracing | None = None  # TRACING on: the spans of writes and projections
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    supervisor: Supervisor = field(default_factory=Supervisor)
    # The loop's clock by which the stop must be over (set when it begins).
    stop_deadline: float | None = None

    def begin_stop(self) -> None:
        """The server stops taking requests: start the clock of SHUTDOWN_TIMEOUT, and have
        the writes in hand answered within part of it, so that their answers are sent before
        the server's own graceful bound (the same setting) cancels the requests."""
        if self.stop_deadline is not None:
            return
        timeout = self.settings.shutdown_timeout
        self.stop_deadline = asyncio.get_running_loop().time() + timeout
        if self.writer is not None:
            self.writer.begin_stop(timeout * _ANSWER_SHARE)

    @property
    def writes(self) -> bool:
        """Does this process serve /write?"""
        return serves_writes(self.role)

    @property
    def reads(self) -> bool:
        """Does this process serve /read?"""
        return serves_reads(self.role)

    def check_value_size(self, value: str) -> None:
        """Refuse a value larger than MAX_VALUE_BYTES with a 413 that names the limit."""
        size = len(value.encode("utf-8"))
        if size > self.settings.max_value_bytes:
            raise HTTPException(
                413, f"value is {size} bytes; the limit is {self.settings.max_value_bytes} bytes"
            )

    async def readiness(self) -> dict[str, str]:
        """Check what this process needs: each dependency maps to "ok" or the error."""
        checks: dict[str, str] = {}
        needed: dict[str, AsyncEngine] = {}
        if self.writes or self.role == "projector":
            needed["write_db"] = self.write_engine
        if self.reads or self.role == "projector":
            needed["read_db"] = self.read_engine
        for name, engine in needed.items():
            checks[name] = await _check(_ping_db(engine))
        checks["redis"] = await _check(self.redis.ping())
        # Background work must never stop while the process lives, and one that keeps
        # failing makes the process unready until it recovers.
        checks.update(self.supervisor.checks())
        return checks

    def required_checks(self) -> set[str]:
        """Checks that decide readiness: writes still succeed without Redis (events queue).

        The projector needs Redis: without it only the write-DB sweep projects, every
        PROJECTOR_CATCHUP_INTERVAL, so it reports not ready rather than healthy.
        """
        required = {"write_db"} if self.writes else set()
        if self.reads:
            required.add("read_db")
        if self.role == "projector":
            required |= {"write_db", "read_db", "redis"}
        return required | self.supervisor.required_checks()


async def _ping_db(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _check(probe: object) -> str:
    try:
        await asyncio.wait_for(probe, 2.0)  # type: ignore[arg-type]
    except Exception as exc:  # a probe reports, it does not raise
        return f"error: {type(exc).__name__}: {exc}"[:300]
    return "ok"


async def open_resources(
    settings: Settings, role: Role, tracing: Tracing | None = None
) -> Resources:
    """Open the engines and Redis client and start the background work of ``role`` (its
    writes and projections traced with ``tracing``, if given)."""
    resources = Resources(
        settings=settings,
        role=role,
        write_engine=db.write_engine(settings, role),
        read_engine=db.read_engine(settings, role),
        write_pool=await db.create_pool(
            settings.write_db_url,
            settings,
            application_name=f"cqrs-{role}",
            # A write API frozen inside a keyed write's transaction must not hold its keys.
            idle_transaction_timeout=(
                settings.write_idle_transaction_timeout if serves_writes(role) else None
            ),
        ),
        read_pool=await db.create_pool(
            settings.read_db_url, settings, application_name=f"cqrs-{role}"
        ),
        redis=stream.connect(settings),
        tracing=tracing,
    )
    supervisor = resources.supervisor = Supervisor(retry_max_delay=settings.task_retry_max_delay)
    if resources.writes:
        resources.writer = CommandWriter(
            resources.write_pool, resources.redis, settings, resources.tracing
        )
        resources.writer.start(supervisor)
        supervisor.run(
            "publisher",
            lambda: publish_queued(resources.write_engine, resources.redis, settings),
            until=resources.stopping,
            interval=settings.publisher_interval,
            essential=False,  # writes are answered without it (their events queue)
        )
        supervisor.run(
            "idempotency-expiry",
            lambda: expire_idempotency_keys(resources.write_pool, settings),
            until=resources.stopping,
            interval=settings.idempotency_expiry_interval,
            essential=False,  # writes are answered without it (expired keys wait longer)
        )
    if resources.reads:
        counter = ReadCounter(
            resources.read_engine, settings.read_count_flush_interval, settings.read_count_max_keys
        )
        resources.read_counter = counter
        supervisor.run(
            "read-counter",
            counter.flush_round,
            until=resources.stopping,
            interval=counter.interval,
            first_after=counter.interval,
            essential=False,  # reads are answered without it (counts wait in memory)
        )
        resources.records = RecordReader(
            resources.read_pool,
            counter,
            settings.read_select_concurrency,
            settings.read_batch_max_keys,
        )
    if role == "projector":
        resources.projector = Projector(
            settings,
            resources.write_engine,
            resources.read_engine,
            resources.read_pool,
            resources.redis,
            resources.tracing,
        )
        resources.projector.start(supervisor, resources.stopping)
    return resources


async def close_resources(resources: Resources) -> None:
    """Drain: finish queued writes, the projector's batch and read counts, then disconnect.

    Background work in progress (a flush waiting on a row lock, a batch being applied) is
    finished, not cancelled, within SHUTDOWN_TIMEOUT in all; then every counted read is
    flushed in what is left of it.
    """
    loop = asyncio.get_running_loop()
    resources.begin_stop()
    assert resources.stop_deadline is not None
    deadline = resources.stop_deadline
    resources.stopping.set()
    if resources.writer is not None:
        await resources.writer.stop(max(0.0, deadline - loop.time()))
    await resources.supervisor.stop(None, max(0.0, deadline - loop.time()))
    if resources.read_counter is not None:
        await resources.read_counter.drain(max(0.0, deadline - loop.time()))
    if resources.projector is not None:
        log.info("projector stopped consumer=%s", resources.projector.consumer)
    try:
        # A hung server never answers a polite goodbye: bounded, then connections are cut.
        async with asyncio.timeout(max(deadline - loop.time(), _DISCONNECT_FLOOR)):
            await resources.redis.aclose()
            await resources.write_pool.close()
            await resources.read_pool.close()
            await resources.write_engine.dispose()
            await resources.read_engine.dispose()
    except TimeoutError:
        log.error("disconnecting took longer than the stop allows: connections cut")
        resources.write_pool.terminate()
        resources.read_pool.terminate()
    if resources.tracing is not None:
        # What is left of SHUTDOWN_TIMEOUT only, no floor: an export is worth no overrun.
        await resources.tracing.shutdown(max(0.0, deadline - loop.time()))
    log.info("stopped role=%s", resources.role)
