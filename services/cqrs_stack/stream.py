"""Redis Streams access: publishing events, the consumer group, claiming and dead letters."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from . import events
from .config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    """A stream entry handed to this consumer, with how often it was delivered."""

    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1


def connect(settings: Settings) -> Redis:
    """Return an asyncio Redis client; short timeouts so that an outage fails fast."""
    return Redis.from_url(
        settings.redis_url,
        # Headroom for XREADGROUP's BLOCK; short enough that a hung Redis is noticed quickly.
        socket_timeout=settings.redis_timeout + settings.projector_poll_interval + 1.0,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=30,
    )


# One XADD per event, all of a batch's in one script: Redis runs it atomically (no other
# client's entry lands between them, none is added twice) and answers one array of ids, which
# costs the client a fraction of parsing one reply per XADD. ARGV: the MAXLEN (0: no trim),
# then five values per event, in events.encode's order.
_XADD_ALL = b"""
local maxlen = ARGV[1]
local ids = {}
for i = 2, #ARGV, 5 do
  if maxlen == '0' then
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'type', ARGV[i], 'position', ARGV[i + 1],
      'key', ARGV[i + 2], 'value', ARGV[i + 3], 'created_at', ARGV[i + 4])
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'type', ARGV[i],
      'position', ARGV[i + 1], 'key', ARGV[i + 2], 'value', ARGV[i + 3],
      'created_at', ARGV[i + 4])
  end
end
return ids
"""
_FIELDS = ("type", "position", "key", "value", "created_at")


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack_publish(stream: str, commands: Sequence[events.Command], max_length: int) -> bytes:
    """The RESP bytes of the one ``EVAL`` that adds the commands' events (``_XADD_ALL``).

    Built here, not by the client's generic per-argument packing, which cost more CPU than
    the rest of a write's publishing together.
    """
    parts = [
        b"*%d\r\n" % (5 + 5 * len(commands)),
        _bulk(b"EVAL"),
        _bulk(_XADD_ALL),
        b"$1\r\n1\r\n",
        _bulk(stream.encode()),
        _bulk(str(max_length).encode()),
    ]
    for command in commands:
        fields = events.encode(command)
        if tuple(fields) != _FIELDS:  # the script names the fields: they must agree
            raise ValueError(f"event fields changed: {tuple(fields)}")
        parts += [_bulk(value.encode()) for value in fields.values()]
    return b"".join(parts)


def pack_xadds(stream: str, commands: Sequence[events.Command], max_length: int) -> bytes:
    """The RESP bytes of one ``XADD`` per command: the fallback where scripts are refused."""
    head = [b"XADD", stream.encode()]
    if max_length:
        head += [b"MAXLEN", b"~", str(max_length).encode()]
    prefix = b"*%d\r\n" % (len(head) + 11) + b"".join(map(_bulk, head)) + b"$1\r\n*\r\n"
    parts = []
    for command in commands:
        parts.append(prefix)
        for name, value in events.encode(command).items():
            parts += [_bulk(name.encode()), _bulk(value.encode())]
    return b"".join(parts)


class _Scripts:
    """Whether this Redis runs our script; an ACL without EVAL (a user provisioned before
    it was needed) is learnt once, then every batch goes as pipelined XADDs."""

    refused = False


def _refuses_scripts(exc: ResponseError) -> bool:
    """An ACL without EVAL (NOPERM), or a server with EVAL renamed away."""
    text = str(exc).lower()
    refused = isinstance(exc, NoPermissionError) or "unknown command" in text
    return refused and "'eval'" in text


async def publish(
    redis: Redis, stream: str, commands: Sequence[events.Command], max_length: int
) -> list[str]:
    """Add one event per command to the stream in one round trip; return the stream ids.

    One script adds them all (each command's event its own entry, in order): one request,
    one reply, on one pooled connection; where scripts are refused, one XADD per event,
    pipelined, every reply read before an error is raised. A connection cut short (timeout,
    cancellation) is disconnected by the client, never reused half-read. No retry here: an
    event that may have been added is left to the publisher (at worst a duplicate, never a
    loss).
    """
    if not commands:
        return []
    if not _Scripts.refused:
        try:
            reply: Any = await _round_trip(redis, pack_publish(stream, commands, max_length), 1)
            return [_id(i) for i in reply[0]]
        except ResponseError as exc:
            if not _refuses_scripts(exc):
                raise
            _Scripts.refused = True
            log.warning("redis refuses EVAL, publishing with one XADD per event error=%s", exc)
    replies = await _round_trip(redis, pack_xadds(stream, commands, max_length), len(commands))
    return [_id(i) for i in replies]


async def _round_trip(redis: Redis, packed: bytes, replies: int) -> list[Any]:
    """Send ``packed`` on one pooled connection and read ``replies`` replies; the first error
    reply is raised once all are read."""
    pool = redis.connection_pool
    conn = await pool.get_connection()
    answers: list[Any] = []
    first_error: ResponseError | None = None
    try:
        await conn.send_packed_command(packed)
        for _ in range(replies):
            try:
                answers.append(await conn.read_response())
            except ResponseError as exc:
                first_error = first_error or exc
    finally:
        await pool.release(conn)
    if first_error is not None:
        raise first_error
    return answers


async def ensure_group(redis: Redis, stream: str, group: str) -> bool:
    """Create the stream and its consumer group if missing; return True when created.

    A new group starts at the beginning of the stream: events already there are projected
    (duplicates are harmless, losses are not).
    """
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    log.info("consumer group created stream=%s group=%s", stream, group)
    return True


async def read_new(
    redis: Redis, stream: str, group: str, consumer: str, count: int, block_ms: int | None
) -> list[Entry]:
    """Read entries never delivered to any consumer of the group (None: do not wait)."""
    # redis-py types replies loosely; this is [(stream, [(id, fields), ...])].
    reply: Any = await redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
    return [Entry(_id(i), f) for _, items in (reply or []) for i, f in items if f is not None]


async def claim_idle(
    redis: Redis, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
) -> list[Entry]:
    """Take over entries that another consumer left pending for ``min_idle_ms`` or longer."""
    pending: Any = await redis.xpending_range(
        stream, group, min="-", max="+", count=count, idle=min_idle_ms
    )
    if not pending:
        return []
    deliveries = {_id(p["message_id"]): int(p["times_delivered"]) + 1 for p in pending}
    claimed: Any = await redis.xclaim(stream, group, consumer, min_idle_ms, list(deliveries))
    entries = []
    for entry_id, fields in claimed:
        eid = _id(entry_id)
        if fields is None:  # trimmed away while pending: nothing left to project
            await redis.xack(stream, group, eid)
            continue
        entries.append(Entry(eid, fields, deliveries.get(eid, 1)))
    return entries


async def acknowledge(redis: Redis, stream: str, group: str, entry_ids: Sequence[str]) -> None:
    """XACK entries whose effect is committed in the read DB."""
    if entry_ids:
        await redis.xack(stream, group, *entry_ids)


async def dead_letter(
    redis: Redis, settings: Settings, entry: Entry, reason: str, consumer: str
) -> None:
    """Move a poison entry to the dead-letter stream and acknowledge it, in one MULTI."""
    fields: dict[str, bytes | str] = {
        k.decode("utf-8", "replace"): v for k, v in entry.fields.items()
    }
    fields.update(
        {
            "dead_letter_reason": reason[:500],
            "dead_letter_source_id": entry.entry_id,
            "dead_letter_deliveries": str(entry.deliveries),
            "dead_letter_consumer": consumer,
        }
    )
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(settings.dead_letter_stream, fields)  # type: ignore[arg-type]
        pipe.xack(settings.event_stream_name, settings.consumer_group, entry.entry_id)
        await pipe.execute()
    log.warning(
        "event dead-lettered entry=%s deliveries=%d reason=%s",
        entry.entry_id,
        entry.deliveries,
        reason[:200],
    )


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
