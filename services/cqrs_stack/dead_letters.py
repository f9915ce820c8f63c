"""Dead letters you can act on: list them, retry them through the projection, or drop them.

The projector moves an entry that the read DB refused ``PROJECTOR_MAX_DELIVERIES`` times to
the dead-letter stream ``<stream>:dead`` (``stream.dead_letter``), and its catch-up sweep a
command the read DB refused (``Projector._dead_letter_refused``), once per command between
them (``stream.dead_letter_once``). From there:

- **list**: pages of at most ``DEAD_LETTER_PAGE_MAX`` entries, oldest first, with the key,
  position, reason, deliveries and age (never the value).
- **retry**: the command is read from the write DB (the source of truth) by the entry's
  position and applied to every read model of ``READ_MODELS`` by the projection's own
  statement, whose ledger makes it exactly once: a command some model applied already (the
  sweep got there first, a second retry of a copy, two retries at once) changes nothing there.
  The entry leaves the dead-letter stream only after that transaction committed; a command the
  read DB still refuses stays where it is.
- **drop**: the entry leaves the stream and is recorded in the read DB (``dead_letter_drops``:
  who, when, why, and the entry's fields). The value is not recorded (user data that may be
  sensitive): its size and SHA-256 are, and the write DB keeps the value at its position.
  Its position is marked dropped (``stream.dead_letter_marks``), so neither the stream nor
  the catch-up sweep dead-letters the command again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import stream, write_db
from .config import Settings
from .db import driver_of
from .events import Command
from .outages import is_refusal, sqlstate
from .projections import apply_batch, enabled

# The entry's own fields that stream.dead_letter adds to the event's.
_REASON, _SOURCE, _DELIVERIES, _CONSUMER = (
    "dead_letter_reason",
    "dead_letter_source_id",
    "dead_letter_deliveries",
    "dead_letter_consumer",
)
_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_ID_PART_MAX = 2**64 - 1
_REASON_MAX = 500  # as stream.dead_letter truncates the projector's reasons
_BY_MAX = 200
_RECORD_DROP = text(
    "INSERT INTO dead_letter_drops"
    " (stream, entry_id, key, position, reason, dropped_by, entry)"
    " VALUES (:stream, :entry_id, :key, :position, :reason, :by, CAST(:entry AS jsonb))"
    # A drop whose XDEL failed is done again: the first record stands.
    " ON CONFLICT (stream, entry_id) DO NOTHING"
)


class DeadLetterError(Exception):
    """A dead-letter operation that cannot be done; the message says why and what to do."""


class DeadLetterNotFound(DeadLetterError):
    """No entry with this id in the dead-letter stream (never there, retried or dropped)."""


class NotRetryable(DeadLetterError):
    """The entry carries no command of the write DB to apply again: drop it instead."""


class RetryRefused(DeadLetterError):
    """The read DB still refuses the command: the entry stays in the dead-letter stream."""


class InvalidRequest(DeadLetterError):
    """An argument out of its bounds (page size, reason, id)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of the dead-letter stream, as it is listed (its value is left out)."""

    entry_id: str
    key: str | None
    position: int | None
    event_type: str | None
    reason: str
    deliveries: int
    consumer: str
    source_id: str
    age_seconds: float
    value_bytes: int
    value_sha256: str | None

    def summary(self) -> dict[str, Any]:
        """The entry as JSON (what ``dlq list --json`` prints and a drop records)."""
        return {
            "id": self.entry_id,
            "key": self.key,
            "position": self.position,
            "type": self.event_type,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "consumer": self.consumer,
            "source_id": self.source_id,
            "age_seconds": round(self.age_seconds, 3),
            "value_bytes": self.value_bytes,
            "value_sha256": self.value_sha256,
        }


@dataclass(frozen=True, slots=True)
class Page:
    """Dead letters oldest first; ``next_after`` is the id to pass for the next page, if any."""

    entries: list[DeadLetter]
    next_after: str | None
    total: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a retry did to one entry."""

    entry_id: str
    position: int | None
    result: Literal["applied", "already applied", "refused", "not retryable"]
    detail: str = ""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _position(raw: str | None) -> int | None:
    try:
        position = int(raw) if raw is not None else 0
    except ValueError:
        return None
    return position if position > 0 else None


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def parse(entry_id: str, fields: dict[bytes, bytes], now_ms: int) -> DeadLetter:
    """A dead-letter entry as stored by ``stream.dead_letter`` (any field may be missing)."""
    data = {_text(k): v for k, v in fields.items()}
    value = data.get("value")
    deliveries = _text(data.get(_DELIVERIES, b"0"))
    return DeadLetter(
        entry_id=entry_id,
        key=_text(data["key"]) if "key" in data else None,
        position=_position(_text(data["position"]) if "position" in data else None),
        event_type=_text(data["type"]) if "type" in data else None,
        reason=_text(data.get(_REASON, b"")),
        deliveries=int(deliveries) if deliveries.isdigit() else 0,
        consumer=_text(data.get(_CONSUMER, b"")),
        source_id=_text(data.get(_SOURCE, b"")),
        # The entry's id is the time Redis dead-lettered it.
        age_seconds=max(0, now_ms - _entry_ms(entry_id)) / 1000,
        value_bytes=len(value) if value is not None else 0,
        value_sha256=hashlib.sha256(value).hexdigest() if value is not None else None,
    )


async def _now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def age_text(seconds: float) -> str:
    """An age in its largest whole unit: 42s, 5m, 3h, 2d."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _check_id(entry_id: str) -> str:
    # Redis stream ids are two unsigned 64-bit integers: a larger part is no id at all.
    if not _ENTRY_ID.match(entry_id) or any(
        int(part) > _ID_PART_MAX for part in entry_id.split("-")
    ):
        raise InvalidRequest(
            f"{entry_id[:60]!r} is not a dead-letter id (a stream id such as 1700000000000-0,"
            " as `dlq list` shows)"
        )
    return entry_id


async def list_page(
    redis: Redis, settings: Settings, limit: int | None = None, after: str | None = None
) -> Page:
    """One page of dead letters, oldest first, after the entry ``after`` (from the start if
    None); at most ``limit`` entries, which is at most DEAD_LETTER_PAGE_MAX (its default)."""
    bound = settings.dead_letter_page_max
    size = bound if limit is None else limit
    if not 1 <= size <= bound:
        raise InvalidRequest(f"a page holds 1 to {bound} dead letters (DEAD_LETTER_PAGE_MAX)")
    start = "-" if after is None else f"({_check_id(after)}"
    name = settings.dead_letter_stream
    # One more than asked tells whether another page follows.
    rows: Any = await redis.xrange(name, min=start, max="+", count=size + 1)
    now_ms = await _now_ms(redis)
    entries = [parse(_text(i), f, now_ms) for i, f in rows[:size]]
    more = len(rows) > size
    total = int(await redis.xlen(name))
    return Page(entries, entries[-1].entry_id if more else None, total)


async def oldest_age(redis: Redis, settings: Settings) -> float | None:
    """Seconds since the oldest entry still in the dead-letter stream was put there."""
    rows: Any = await redis.xrange(settings.dead_letter_stream, count=1)
    if not rows:
        return None
    return max(0, await _now_ms(redis) - _entry_ms(_text(rows[0][0]))) / 1000


async def get(redis: Redis, settings: Settings, entry_id: str) -> DeadLetter:
    """The dead letter ``entry_id``; DeadLetterNotFound if it is not there."""
    _check_id(entry_id)
    rows: Any = await redis.xrange(settings.dead_letter_stream, entry_id, entry_id, count=1)
    if not rows:
        raise DeadLetterNotFound(
            f"no dead letter {entry_id} in {settings.dead_letter_stream} (retried or dropped"
            " already, or never there: `dlq list` shows those left)"
        )
    return parse(entry_id, rows[0][1], await _now_ms(redis))


async def retry(
    redis: Redis,
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    settings: Settings,
    entry_id: str,
) -> Outcome:
    """Apply the command of dead letter ``entry_id`` again, exactly once; then remove it.

    Raises DeadLetterNotFound, NotRetryable (no command of the write DB to apply) or
    RetryRefused (the read DB still refuses it; the entry stays).
    """
    letter = await get(redis, settings, entry_id)
    outcome = await _retry_letter(redis, write_engine, read_engine, settings, letter)
    if outcome.result == "refused":
        raise RetryRefused(outcome.detail)
    if outcome.result == "not retryable":
        raise NotRetryable(outcome.detail)
    return outcome


async def retry_all(
    redis: Redis,
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    settings: Settings,
) -> list[Outcome]:
    """Retry every entry in the dead-letter stream when called, oldest first, one by one.

    Read in pages of DEAD_LETTER_PAGE_MAX up to the newest entry at the start (entries added
    meanwhile are left for the next call). An entry that is refused again, or carries nothing
    to retry, stays and is reported; the others are applied and removed.
    """
    name = settings.dead_letter_stream
    newest: Any = await redis.xrevrange(name, count=1)
    if not newest:
        return []
    last = _text(newest[0][0])
    outcomes: list[Outcome] = []
    cursor: str | None = None  # the last entry handled: the next page starts after it
    pages = int(await redis.xlen(name)) // settings.dead_letter_page_max + 2
    for _ in range(pages):  # bounded: each page handles at least one entry, or ends the loop
        page = await list_page(redis, settings, after=cursor)
        for letter in page.entries:
            if _after(letter.entry_id, last):
                return outcomes  # added after the start
            outcomes.append(await _retry_letter(redis, write_engine, read_engine, settings, letter))
            cursor = letter.entry_id
        if page.next_after is None:
            break
    return outcomes


def _after(entry_id: str, other: str) -> bool:
    """Is stream id ``entry_id`` later than ``other``?"""
    ms, _, seq = entry_id.partition("-")
    other_ms, _, other_seq = other.partition("-")
    return (int(ms), int(seq)) > (int(other_ms), int(other_seq))


async def _retry_letter(
    redis: Redis,
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    settings: Settings,
    letter: DeadLetter,
) -> Outcome:
    if letter.position is None:
        return Outcome(
            letter.entry_id,
            None,
            "not retryable",
            f"dead letter {letter.entry_id} carries no command position ({letter.reason[:200]}):"
            " nothing to apply again; drop it",
        )
    async with write_engine.connect() as wconn:
        commands = await write_db.commands_on(wconn, [letter.position])
    if not commands:
        return Outcome(
            letter.entry_id,
            letter.position,
            "not retryable",
            f"dead letter {letter.entry_id}: the write DB has no command at position"
            f" {letter.position}, so there is nothing to apply; drop it",
        )
    try:
        applied = await _apply(read_engine, settings, commands)
    except (DBAPIError, asyncpg.PostgresError) as exc:
        if not is_refusal(exc):
            raise  # an outage: the caller sees it, the entry stays
        cause = getattr(exc, "orig", None) or exc
        return Outcome(
            letter.entry_id,
            letter.position,
            "refused",
            f"the read DB still refuses the command at position {letter.position}"
            f" (sqlstate {sqlstate(exc)}: {str(cause).splitlines()[0][:200]}); the dead letter"
            " stays",
        )
    # Only now that its effect is committed (or was there already) does the entry go, and
    # its position's mark (stream.dead_letter_marks): the command is applied.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xdel(settings.dead_letter_stream, letter.entry_id)
        pipe.hdel(stream.dead_letter_marks(settings), str(letter.position))
        await pipe.execute()
    return Outcome(letter.entry_id, letter.position, "applied" if applied else "already applied")


async def _apply(read_engine: AsyncEngine, settings: Settings, commands: list[Command]) -> bool:
    """Apply to every model of READ_MODELS in one transaction; True if any found it new.

    No consumer is named: the progress figures are the projector replicas', and a consumer
    row for this one-off would read as a consumer that stopped.
    """
    models = enabled(settings.read_model_names)
    async with read_engine.begin() as conn:
        counts = await apply_batch(await driver_of(conn), models, commands, None)
    return any(counts.values())


async def drop(
    redis: Redis,
    read_engine: AsyncEngine,
    settings: Settings,
    entry_id: str,
    reason: str,
    dropped_by: str,
) -> DeadLetter:
    """Remove dead letter ``entry_id`` without applying it, recorded in ``dead_letter_drops``
    with ``reason`` and ``dropped_by`` (the record is committed before the entry goes)."""
    reason, dropped_by = reason.strip(), dropped_by.strip()
    if not 1 <= len(reason) <= _REASON_MAX:
        raise InvalidRequest(f"a drop needs a reason of 1 to {_REASON_MAX} characters")
    if not 1 <= len(dropped_by) <= _BY_MAX:
        raise InvalidRequest(f"a drop needs who drops it, 1 to {_BY_MAX} characters")
    letter = await get(redis, settings, entry_id)
    params = {
        "stream": settings.dead_letter_stream,
        "entry_id": letter.entry_id,
        "key": letter.key,
        "position": letter.position,
        "reason": reason,
        "by": dropped_by,
        "entry": json.dumps(letter.summary()),
    }
    try:
        async with read_engine.begin() as conn:
            await conn.execute(_RECORD_DROP, params)
    except DBAPIError as exc:
        if sqlstate(exc) == "42P01":  # undefined table: migration 0009 not applied
            raise DeadLetterError(
                "the read DB has no dead_letter_drops table: run `cqrs-stack migrate`"
            ) from exc
        raise
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xdel(settings.dead_letter_stream, letter.entry_id)
        if letter.position is not None:
            # Neither path dead-letters the dropped command again (stream.dead_letter_once).
            pipe.hset(stream.dead_letter_marks(settings), str(letter.position), "dropped")
        await pipe.execute()
    return letter
