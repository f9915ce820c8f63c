"""Why the projection is behind: a typed snapshot of the pipeline's health and its verdict.

One place reads the consumer group (per consumer: pending entries, idle time, the oldest
pending entry), the stream's lag (in events: undelivered plus pending; in seconds: the age of
the oldest entry not yet acknowledged, from its id's millisecond timestamp), the dead letters,
the catch-up sweep's watermark and the write-DB transactions that pin it, and whether Redis
and the read DB answer. ``/stats``, ``cqrs-stack status``, the projector's gauges and the
operator's conditions all read it, so every view names the same cause.

Every reading is bounded (``REDIS_TIMEOUT`` for Redis, a statement timeout for the
databases, a fixed number of round trips) and never raises for an outage: an outage is
part of the answer. ``judge`` is pure: it turns a snapshot (and, where the caller keeps two
readings over time, how long nothing moved) into ok / degraded / stalled with a reason.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import metrics
from .config import Settings
from .outages import sqlstate

Verdict = Literal["ok", "degraded", "stalled"]
_T = TypeVar("_T")

# Consumers whose oldest pending entry is looked up (one XPENDING each), those holding the
# most first: bounds a reading's round trips however many consumer names a group collected.
MAX_CONSUMERS_EXAMINED = 32
# Write-DB transactions named as pinning the sweep's watermark, oldest first.
MAX_PINS_NAMED = 5
# A database's part of a reading is given up after this long: the server's statement_timeout
# for a statement it runs, and the whole wait (connecting included) for a server that accepts
# connections and never answers, which no statement timeout cuts off.
READING_TIMEOUT = 5.0
_STATEMENT_TIMEOUT_MS = int(READING_TIMEOUT * 1000)
# What a reading says of a database that did not answer within READING_TIMEOUT.
NO_ANSWER = f"no answer within {READING_TIMEOUT:g} s"
# Readings given up on and still finishing (a hung server's socket): kept referenced, and
# their outcome retrieved, until they end.
_ABANDONED: set[asyncio.Future[Any]] = set()


async def within(work: Awaitable[_T], seconds: float = READING_TIMEOUT) -> _T:
    """``work``'s result, or TimeoutError after ``seconds``. Given up on, ``work`` is cancelled
    but not waited for: its cleanup (a rollback, a pool check-in) would wait on the same
    server that does not answer."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task in done:
        return task.result()
    task.cancel()
    _ABANDONED.add(task)
    task.add_done_callback(_forget)
    raise TimeoutError(NO_ANSWER)


def _forget(task: asyncio.Future[Any]) -> None:
    _ABANDONED.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: an abandoned reading's outcome is not an error to log


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """A stream entry delivered to a consumer and not acknowledged yet."""

    entry_id: str
    age_seconds: float
    consumer: str
    deliveries: int


@dataclass(frozen=True, slots=True)
class ConsumerHealth:
    """One consumer of the group: what it holds and when it last read."""

    name: str
    pending: int
    idle_seconds: float
    oldest_pending: PendingEntry | None
    stopped: bool  # idle beyond PROJECTOR_STOPPED_AFTER while holding pending entries


@dataclass(frozen=True, slots=True)
class StreamHealth:
    """The consumer group as Redis sees it (zeros and ``reachable=False`` when it does not
    answer; ``error`` is the error's class, never its text)."""

    reachable: bool
    error: str | None = None
    group_exists: bool = False
    length: int = 0
    pending: int = 0
    undelivered: int = 0
    lag_seconds: float = 0.0
    oldest_pending: PendingEntry | None = None
    consumers: tuple[ConsumerHealth, ...] = ()
    # Changes whenever the group moves (an entry delivered or acknowledged): two equal
    # readings over time mean no progress.
    progress: str = ""

    @property
    def lag_events(self) -> int:
        """Entries not acknowledged by the group: undelivered plus pending."""
        return self.pending + self.undelivered

    @property
    def stopped(self) -> tuple[ConsumerHealth, ...]:
        """Consumers that stopped reading while holding pending entries."""
        return tuple(c for c in self.consumers if c.stopped)

    def reading(self, stopped_after: float) -> tuple[ConsumerHealth, ...]:
        """Consumers that read within ``stopped_after`` seconds."""
        return tuple(c for c in self.consumers if c.idle_seconds <= stopped_after)


@dataclass(frozen=True, slots=True)
class PinningTransaction:
    """A write-DB transaction still open that the sweep passed: its commands are not swept
    until it ends, and the watermark stays at or below its xid. No query text is kept (it
    may carry values), only its first word."""

    xid: int
    pid: int | None = None
    application_name: str | None = None
    state: str | None = None
    open_seconds: float | None = None
    state_seconds: float | None = None
    statement: str | None = None

    def describe(self) -> str:
        """``transaction 123 (pid 45, app 'psql', idle in transaction for 31 s)``."""
        if self.pid is None:
            return (
                f"transaction {self.xid} (unknown session: none this role can see holds it, so"
                " its database is not known)"
            )
        since = self.state_seconds if self.state_seconds is not None else self.open_seconds
        return (
            f"transaction {self.xid} (pid {self.pid}, app {self.application_name or ''!r},"
            f" {self.state or 'unknown state'} for {since or 0:.0f} s)"
        )


@dataclass(frozen=True, slots=True)
class CatchUpHealth:
    """The catch-up sweep's position: the lowest watermark over the read models.

    ``age_seconds`` is how stale the guarantee "every command below the watermark is swept"
    may be: the time since the last sweep, or the age of the oldest transaction pinning the
    watermark when that is longer. None before the first sweep.

    ``pinned_by`` holds only transactions of the stack's write database (pg_stat_activity's
    datname is the write engine's current_database()): a transaction of another database
    of the same server can never write ``commands``, so it pins nothing the sweep waits for
    and is not named. Another role's session shows its database and pid, not its state or
    age (without pg_read_all_stats): it is named and ages nothing. A transaction with no
    session this role sees (a prepared transaction, a session just ended) cannot be placed
    in a database: it is listed in ``unplaced`` and neither ages the watermark nor degrades
    the verdict.
    """

    available: bool
    error: str | None = None
    model: str | None = None
    watermark: int | None = None
    swept_seconds_ago: float | None = None
    age_seconds: float | None = None
    pending_transactions: int = 0
    pinned_by: tuple[PinningTransaction, ...] = ()
    unplaced: tuple[PinningTransaction, ...] = ()


@dataclass(frozen=True, slots=True)
class DeadLetters:
    """Entries in the dead-letter stream and the age of the oldest."""

    count: int = 0
    oldest_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Bounds:
    """The thresholds a verdict uses (Settings: PROJECTION_LAG_TARGET,
    PROJECTOR_STOPPED_AFTER, PROJECTOR_CATCHUP_INTERVAL)."""

    lag_target: float
    stopped_after: float
    catchup_interval: float

    @classmethod
    def of(cls, settings: Settings) -> Bounds:
        """The bounds configured in ``settings``."""
        return cls(
            settings.projection_lag_target,
            settings.projector_stopped_after,
            settings.projector_catchup_interval,
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Bounds:
        """The bounds from the variables of the same names (Settings' bounds and defaults)
        alone: for a reader without the stack's whole configuration, such as the operator."""
        environ = os.environ if environ is None else environ
        values = []
        for name in (
            "projection_lag_target",
            "projector_stopped_after",
            "projector_catchup_interval",
        ):
            info = Settings.model_fields[name]
            given = environ.get(name.upper())
            if given is None:
                values.append(float(info.default))
                continue
            try:
                values.append(TypeAdapter(Annotated[float, *info.metadata]).validate_python(given))
            except ValidationError as exc:
                raise ValueError(f"{name.upper()}: {exc.errors()[0]['msg']}") from None
        return cls(*values)


@dataclass(frozen=True, slots=True)
class Judgement:
    """The verdict, the cause as one CamelCase word (a condition's reason) and in words."""

    verdict: Verdict
    cause: str
    reason: str


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The pipeline's health at ``checked_at`` (seconds since the epoch) and its verdict."""

    checked_at: float
    stream: StreamHealth
    dead_letters: DeadLetters | None  # None: Redis did not answer
    catch_up: CatchUpHealth
    read_db_error: str | None
    judgement: Judgement
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the verdict and reason first, then every reading."""
        stream = asdict(self.stream)
        # A group keeps the name of every consumer that ever read (each restarted pod adds
        # one): the answer lists those that matter most (holding entries, then most recent).
        stream["consumers"] = stream["consumers"][:MAX_CONSUMERS_EXAMINED]
        stream["consumers_total"] = len(self.stream.consumers)
        stream["lag_events"] = self.stream.lag_events
        stream["stopped_consumers"] = [c.name for c in self.stream.stopped]
        return {
            "verdict": self.judgement.verdict,
            "cause": self.judgement.cause,
            "reason": self.judgement.reason,
            "checked_at": round(self.checked_at, 3),
            "redis_reachable": self.stream.reachable,
            "read_db_error": self.read_db_error,
            "stream": stream,
            "dead_letters": None if self.dead_letters is None else asdict(self.dead_letters),
            "catch_up": asdict(self.catch_up),
        }


def entry_age(entry_id: str, now: float) -> float:
    """Seconds since a stream entry was added, from its id (``<ms>-<seq>``)."""
    try:
        millis = int(entry_id.split("-", 1)[0])
    except ValueError:
        return 0.0
    return max(0.0, round(now - millis / 1000, 3))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def error_name(exc: BaseException) -> str:
    """What failed, without the error's text (which may carry a host or a user name): the
    driver's error class and its SQLSTATE when there is one."""
    cause = getattr(exc, "orig", None) or exc
    cause = getattr(cause, "__cause__", None) or cause
    code = sqlstate(exc)
    return f"{type(cause).__name__}" + (f" (SQLSTATE {code})" if code else "")


async def read_stream(
    redis: Redis, stream: str, group: str, stopped_after: float, within: float
) -> StreamHealth:
    """Read the consumer group's health in a bounded number of round trips."""
    try:
        async with asyncio.timeout(within):
            return await _read_stream(redis, stream, group, stopped_after)
    except (RedisError, OSError) as exc:  # TimeoutError is an OSError
        return StreamHealth(reachable=False, error=type(exc).__name__)


async def _read_stream(redis: Redis, stream: str, group: str, stopped_after: float) -> StreamHealth:
    now = time.time()
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        return StreamHealth(reachable=True)
    length = int(await redis.xlen(stream))
    info = next((g for g in groups if _text(g.get("name")) == group), None)
    if info is None:
        return StreamHealth(reachable=True, length=length)
    pending = int(info.get("pending") or 0)
    lag = info.get("lag")
    last_delivered = _text(info.get("last-delivered-id") or "0-0")
    first_undelivered = None
    if lag is None:
        # Unknown to Redis (6.2, or 7 after XGROUP SETID or deletions): counting would read
        # every entry after the last delivered one, so one entry there counts as "at least 1".
        first_undelivered = await _first_after(redis, stream, last_delivered)
        undelivered = 0 if first_undelivered is None else 1
    else:
        undelivered = int(lag)
        if undelivered:
            first_undelivered = await _first_after(redis, stream, last_delivered)
    consumers = await _consumers(redis, stream, group, stopped_after, now)
    # The group's own lowest pending id (whichever consumer holds it, examined or not).
    oldest = await _oldest_pending(redis, stream, group, None, now) if pending else None
    ages = [entry_age(i, now) for i in (first_undelivered,) if i is not None]
    if oldest is not None:
        ages.append(oldest.age_seconds)
    entries_read = info.get("entries-read")
    acknowledged = int(entries_read) - pending if entries_read is not None else None
    marker = f"acked:{acknowledged}" if acknowledged is not None else ""
    return StreamHealth(
        reachable=True,
        group_exists=True,
        length=length,
        pending=pending,
        undelivered=undelivered,
        lag_seconds=max(ages, default=0.0),
        oldest_pending=oldest,
        consumers=consumers,
        progress=marker or f"{last_delivered}|{oldest.entry_id if oldest else ''}",
    )


async def _consumers(
    redis: Redis, stream: str, group: str, stopped_after: float, now: float
) -> tuple[ConsumerHealth, ...]:
    listed: Any = await redis.xinfo_consumers(stream, group)
    rows = sorted(
        ((_text(c["name"]), int(c.get("pending") or 0), int(c.get("idle") or 0)) for c in listed),
        key=lambda row: (-row[1], row[2]),
    )
    found = []
    for index, (name, pending, idle_ms) in enumerate(rows):
        examined = pending and index < MAX_CONSUMERS_EXAMINED
        oldest = await _oldest_pending(redis, stream, group, name, now) if examined else None
        idle = idle_ms / 1000
        found.append(
            ConsumerHealth(
                name, pending, idle, oldest, stopped=stopped(idle, pending, stopped_after)
            )
        )
    return tuple(found)


def stopped(idle_seconds: float, pending: int, stopped_after: float) -> bool:
    """A consumer stopped reading: idle longer than ``stopped_after`` while holding entries."""
    return pending > 0 and idle_seconds > stopped_after


async def _oldest_pending(
    redis: Redis, stream: str, group: str, consumer: str | None, now: float
) -> PendingEntry | None:
    rows: Any = await redis.xpending_range(
        stream, group, min="-", max="+", count=1, consumername=consumer
    )
    if not rows:
        return None
    row = rows[0]
    entry_id = _text(row["message_id"])
    return PendingEntry(
        entry_id, entry_age(entry_id, now), _text(row["consumer"]), int(row["times_delivered"])
    )


async def _first_after(redis: Redis, stream: str, entry_id: str) -> str | None:
    rows: Any = await redis.xrange(stream, min=f"({entry_id}", max="+", count=1)
    return _text(rows[0][0]) if rows else None


async def read_dead_letters(redis: Redis, dead_stream: str, within: float) -> DeadLetters | None:
    """Entries in the dead-letter stream and the oldest's age; None when Redis fails."""
    try:
        async with asyncio.timeout(within):
            count = int(await redis.xlen(dead_stream))
            first: Any = await redis.xrange(dead_stream, count=1) if count else []
    except (RedisError, OSError):
        return None
    oldest = entry_age(_text(first[0][0]), time.time()) if first else None
    return DeadLetters(count, oldest)


# The sweep's lowest watermark over the models, when it last swept, and the transactions it
# passed while they were open that are still open now (pg_xact_status needs no privilege).
_SWEEP_STATE = text(
    "SELECT model, watermark::text, extract(epoch FROM now() - swept_at)::float8,"
    " ARRAY(SELECT DISTINCT txid::text FROM projector_catchup_pending)"
    " FROM projector_catchup ORDER BY watermark, model LIMIT 1"
)
_STILL_OPEN = text(
    "SELECT t FROM unnest(CAST(:txids AS text[])) AS t"
    " WHERE pg_xact_status(CAST(t AS xid8)) = 'in progress' ORDER BY CAST(t AS xid8)"
)
# The sessions of those transactions. backend_xid is 32-bit: its epoch is that of the next
# xid, less one when it is numerically above the next xid's low half (it wrapped since).
_PINS = text(
    "WITH next AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS x),"
    " sessions AS (SELECT a.pid, a.application_name, a.state,"
    "  extract(epoch FROM now() - a.xact_start)::float8 AS open_for,"
    "  extract(epoch FROM now() - a.state_change)::float8 AS state_for,"
    "  substring(ltrim(a.query) FROM '^[A-Za-z]+') AS statement,"
    "  a.datname IS NOT DISTINCT FROM current_database() AS ours,"
    "  next.x - ((next.x % 4294967296) - a.backend_xid::text::bigint + 4294967296)"
    "   % 4294967296 AS full_xid"
    "  FROM pg_stat_activity a, next WHERE a.backend_xid IS NOT NULL)"
    " SELECT full_xid, pid, application_name, state, open_for, state_for, statement, ours"
    " FROM sessions WHERE full_xid = ANY(CAST(:txids AS bigint[]))"
)
_BOUND = text("SELECT set_config('statement_timeout', :ms, true)")


async def read_catch_up(write_engine: AsyncEngine, read_engine: AsyncEngine) -> CatchUpHealth:
    """The sweep's watermark, its age and the write-DB transactions that pin it."""
    try:
        row = await within(_sweep_state(read_engine))
    except TimeoutError:
        return CatchUpHealth(available=False, error=f"read DB: {NO_ANSWER}")
    except (SQLAlchemyError, OSError) as exc:
        return CatchUpHealth(available=False, error=error_name(exc))
    if row is None:
        return CatchUpHealth(available=True)  # never swept yet
    model, watermark, swept_ago, pending = row
    try:
        pins, unplaced = await within(_pins(write_engine, [int(t) for t in pending or ()]))
    except (SQLAlchemyError, OSError) as exc:  # TimeoutError included
        return CatchUpHealth(
            available=False,
            error=f"write DB: {NO_ANSWER if isinstance(exc, TimeoutError) else error_name(exc)}",
            model=model,
            watermark=int(watermark),
            swept_seconds_ago=swept_ago,
        )
    ages = [swept_ago] if swept_ago is not None else []
    ages += [p.open_seconds for p in pins if p.open_seconds is not None]
    return CatchUpHealth(
        available=True,
        model=model,
        watermark=int(watermark),
        swept_seconds_ago=None if swept_ago is None else round(swept_ago, 3),
        age_seconds=round(max(ages), 3) if ages else None,
        pending_transactions=len(pending or ()),
        pinned_by=tuple(pins),
        unplaced=tuple(unplaced),
    )


async def _sweep_state(read_engine: AsyncEngine) -> Any:
    async with read_engine.begin() as conn:
        await conn.execute(_BOUND, {"ms": str(_STATEMENT_TIMEOUT_MS)})
        return (await conn.execute(_SWEEP_STATE)).first()


async def _pins(
    write_engine: AsyncEngine, pending: Sequence[int]
) -> tuple[list[PinningTransaction], list[PinningTransaction]]:
    """The open transactions among ``pending``: those of the stack's write database, and
    those without a session this role sees (their database unknown); oldest first,
    at most MAX_PINS_NAMED each. Transactions of other databases are left out."""
    if not pending:
        return [], []
    async with write_engine.begin() as conn:
        await conn.execute(_BOUND, {"ms": str(_STATEMENT_TIMEOUT_MS)})
        txids = [str(t) for t in pending]
        open_ = [int(t) for t in (await conn.scalars(_STILL_OPEN, {"txids": txids}))]
        if not open_:
            return [], []
        rows = await conn.execute(_PINS, {"txids": open_})
        seen = {int(r[0]): r for r in rows}
    pins: list[PinningTransaction] = []
    unplaced: list[PinningTransaction] = []
    for xid in open_:
        r = seen.get(xid)
        if r is None:  # no session seen holds it (prepared, just ended): database unknown
            if len(unplaced) < MAX_PINS_NAMED:
                unplaced.append(PinningTransaction(xid))
            continue
        if not r[7] or len(pins) >= MAX_PINS_NAMED:
            continue  # another database's transaction never writes `commands`
        pins.append(
            PinningTransaction(
                xid,
                int(r[1]),
                r[2],
                r[3],
                None if r[4] is None else round(r[4], 3),
                None if r[5] is None else round(r[5], 3),
                r[6].upper() if r[6] else None,
            )
        )
    return pins, unplaced


async def read_db_error(read_engine: AsyncEngine) -> str | None:
    """None when the read DB answers a query within READING_TIMEOUT; else what refused,
    without its text, or NO_ANSWER."""
    try:
        await within(_select_one(read_engine))
    except TimeoutError:
        return NO_ANSWER
    except (DBAPIError, SQLAlchemyError, OSError) as exc:
        return error_name(exc)
    return None


async def _select_one(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def diagnose(
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    redis: Redis,
    settings: Settings,
    no_progress_for: float | None = None,
) -> Diagnosis:
    """Read the pipeline's health and judge it.

    ``no_progress_for``: seconds over which a caller keeping earlier readings saw the group
    not move while it had work (None when it keeps none).
    """
    bounds = Bounds.of(settings)
    stream_health, dead, catch_up, refused = await asyncio.gather(
        read_stream(
            redis,
            settings.event_stream_name,
            settings.consumer_group,
            bounds.stopped_after,
            settings.redis_timeout,
        ),
        read_dead_letters(redis, settings.dead_letter_stream, settings.redis_timeout),
        read_catch_up(write_engine, read_engine),
        read_db_error(read_engine),
    )
    judgement = judge(stream_health, catch_up, refused, bounds, no_progress_for)
    return Diagnosis(time.time(), stream_health, dead, catch_up, refused, judgement)


def judge(
    health: StreamHealth,
    catch_up: CatchUpHealth | None,
    read_db_refusal: str | None,
    bounds: Bounds,
    no_progress_for: float | None = None,
) -> Judgement:
    """ok, degraded (progress, but lag over the target) or stalled (no progress while there
    is work), naming the cause that matters most. Pure."""
    if read_db_refusal == NO_ANSWER:
        return Judgement("stalled", "ReadDbNotAnswering", f"read DB: {NO_ANSWER}")
    if read_db_refusal is not None:
        return Judgement("stalled", "ReadDbRefusing", f"read DB refusing: {read_db_refusal}")
    if not health.reachable:
        return Judgement(
            "degraded",
            "RedisUnreachable",
            f"Redis unreachable ({health.error}): the stream is not read; only the catch-up"
            f" sweep projects, every {bounds.catchup_interval:g} s",
        )
    work = health.lag_events
    # Work waiting longer than the bound, and nobody read within it: an entry only just added
    # (a live consumer is between two reads) is not yet a sign.
    waiting = work and health.lag_seconds > bounds.stopped_after
    if waiting and not health.reading(bounds.stopped_after):
        return Judgement(
            "stalled",
            "NoConsumerReading",
            f"no consumer reads the stream: {_backlog(health, bounds)}",
        )
    if work and no_progress_for is not None and no_progress_for > bounds.stopped_after:
        return Judgement(
            "stalled",
            "NoProgress",
            f"no progress for {no_progress_for:.0f} s: {_backlog(health, bounds)}",
        )
    if health.stopped:
        return Judgement("degraded", "ConsumerStopped", _stopped_text(health.stopped))
    if health.lag_seconds > bounds.lag_target:
        return Judgement(
            "degraded",
            "LagOverTarget",
            f"lag {health.lag_seconds:.0f} s over the target {bounds.lag_target:g} s:"
            f" {_backlog(health, bounds)}",
        )
    sweep = _sweep_trouble(catch_up, bounds)
    if sweep is not None:
        return Judgement("degraded", *sweep)
    return Judgement("ok", "KeepsUp", "projection keeps up")


def _backlog(health: StreamHealth, bounds: Bounds) -> str:
    parts = [f"{health.lag_events} entries not acknowledged ({health.undelivered} undelivered)"]
    oldest = health.oldest_pending
    if oldest is not None:
        parts.append(
            f"oldest pending {oldest.entry_id} ({oldest.age_seconds:.0f} s old, consumer"
            f" {oldest.consumer!r}, {oldest.deliveries} deliveries)"
        )
    if health.stopped:
        parts.append(_stopped_text(health.stopped))
    elif not health.consumers:
        parts.append("the group has no consumer")
    return "; ".join(parts)


def _stopped_text(consumers: Sequence[ConsumerHealth]) -> str:
    named = ", ".join(
        f"{c.name!r} idle {c.idle_seconds:.0f} s holding {c.pending} pending" for c in consumers
    )
    return f"consumer stopped reading: {named}"


def _sweep_trouble(catch_up: CatchUpHealth | None, bounds: Bounds) -> tuple[str, str] | None:
    if catch_up is None:
        return None
    if not catch_up.available:
        return "SweepUnreadable", f"catch-up sweep not read: {catch_up.error}"
    age = catch_up.age_seconds
    if age is None or age <= bounds.lag_target:
        return None
    if catch_up.pinned_by:
        pin = catch_up.pinned_by[0].describe()
        return "WatermarkPinned", f"catch-up watermark pinned by write-DB {pin}"
    if (catch_up.swept_seconds_ago or 0) > bounds.lag_target + bounds.catchup_interval:
        return "SweepNotRunning", f"catch-up sweep last ran {catch_up.swept_seconds_ago:.0f} s ago"
    return None


def progress_since(
    previous: Mapping[str, Any] | None, health: StreamHealth, now: float
) -> tuple[dict[str, Any], float | None]:
    """Keep two readings over time: the newest progress marker and since when it holds.

    Returns the record to keep (``{"marker": ..., "since": ...}``) and how long the group
    has not moved while it had work (None without an earlier reading or without work).
    A reading without work, or with a changed marker, starts afresh.
    """
    if not health.reachable:
        return dict(previous or {}), None
    marker = health.progress
    if not health.lag_events or previous is None or previous.get("marker") != marker:
        return {"marker": marker, "since": now}, None
    since = float(previous.get("since", now))
    return {"marker": marker, "since": since}, max(0.0, now - since)


class GaugeRecorder:
    """Sets the projector's health gauges from each reading.

    A part that could not be read leaves its gauges at their last value, except the catch-up
    watermark's age: it is counted from the last sweep seen (or from this recorder's start
    when none was ever seen), so a sweep that never ran or cannot be read reads as stale,
    not as healthy.
    """

    def __init__(self, now: float | None = None) -> None:
        self.started = time.time() if now is None else now
        self.last_swept_at: float | None = None

    def record(self, found: Diagnosis, now: float | None = None) -> None:
        """Set every gauge that ``found`` has a reading for."""
        now = time.time() if now is None else now
        if found.stream.reachable:
            metrics.PROJECTION_LAG_EVENTS.set(found.stream.lag_events)
            metrics.PROJECTION_LAG_SECONDS.set(found.stream.lag_seconds)
            oldest = found.stream.oldest_pending
            metrics.PROJECTION_OLDEST_PENDING_SECONDS.set(oldest.age_seconds if oldest else 0.0)
        if found.dead_letters is not None:
            metrics.DEAD_LETTER_ENTRIES.set(found.dead_letters.count)
            metrics.OLDEST_DEAD_LETTER_SECONDS.set(found.dead_letters.oldest_seconds or 0.0)
        metrics.CATCHUP_WATERMARK_AGE_SECONDS.set(self.watermark_age(found.catch_up, now))

    def watermark_age(self, catch_up: CatchUpHealth, now: float) -> float:
        """The reading's age when it has one; else the time since the last sweep seen."""
        if catch_up.swept_seconds_ago is not None:
            self.last_swept_at = now - catch_up.swept_seconds_ago
        if catch_up.available and catch_up.age_seconds is not None:
            return catch_up.age_seconds
        return round(now - (self.last_swept_at or self.started), 3)


def describe(found: Diagnosis) -> list[str]:
    """The health as lines for a terminal (``cqrs-stack status``)."""
    stream = found.stream
    lines = [
        "",
        f"health: {found.judgement.verdict.upper()}: {found.judgement.reason}",
        f"  stream lag: {stream.lag_events} entries ({stream.undelivered} undelivered,"
        f" {stream.pending} pending), {stream.lag_seconds:.1f} s",
    ]
    if not stream.reachable:
        lines.append(f"  Redis unreachable ({stream.error})")
    if found.read_db_error == NO_ANSWER:
        lines.append(f"  read DB: {NO_ANSWER}")
    elif found.read_db_error:
        lines.append(f"  read DB refusing: {found.read_db_error}")
    for consumer in stream.consumers[:MAX_CONSUMERS_EXAMINED]:
        oldest = consumer.oldest_pending
        held = (
            f", oldest pending {oldest.entry_id} ({oldest.age_seconds:.1f} s old,"
            f" {oldest.deliveries} deliveries)"
            if oldest
            else ""
        )
        mark = "  STOPPED" if consumer.stopped else ""
        lines.append(
            f"  consumer {consumer.name}: {consumer.pending} pending, idle"
            f" {consumer.idle_seconds:.1f} s{held}{mark}"
        )
    if len(stream.consumers) > MAX_CONSUMERS_EXAMINED:
        more = len(stream.consumers) - MAX_CONSUMERS_EXAMINED
        lines.append(f"  ... and {more} more consumers (idle longer or holding fewer entries)")
    sweep = found.catch_up
    if not sweep.available:
        lines.append(f"  catch-up sweep: not read ({sweep.error})")
    elif sweep.watermark is not None:
        age = "never swept" if sweep.age_seconds is None else f"age {sweep.age_seconds:.1f} s"
        lines.append(f"  catch-up watermark: {sweep.watermark} ({sweep.model}), {age}")
    for pin in sweep.pinned_by:
        lines.append(f"    pinned by write-DB {pin.describe()}")
    for pin in sweep.unplaced:
        lines.append(f"    open, not counted as a pin: {pin.describe()}")
    dead = found.dead_letters
    if dead is not None:
        oldest_dead = "" if dead.oldest_seconds is None else f", oldest {dead.oldest_seconds:.0f} s"
        lines.append(f"  dead letters: {dead.count}{oldest_dead}")
    return lines
