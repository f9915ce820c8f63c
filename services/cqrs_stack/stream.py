"""Redis Streams access: publishing events, the consumer group, claiming and dead letters."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError, ResponseError, WatchError

from . import events
from .config import Settings, dead_letter_stream_of

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
# The same with TRACING on: a sixth value per event, its traceparent (tracing.py), added as the
# entry's field of that name unless empty. A script of its own, so that untraced batches send
# and run exactly what they did before.
_XADD_ALL_TRACED = b"""
local maxlen = ARGV[1]
local ids = {}
for i = 2, #ARGV, 6 do
  local args = {KEYS[1]}
  if maxlen ~= '0' then
    args[2] = 'MAXLEN'; args[3] = '~'; args[4] = maxlen
  end
  args[#args + 1] = '*'
  local names = {'type', 'position', 'key', 'value', 'created_at'}
  for j = 1, 5 do
    args[#args + 1] = names[j]; args[#args + 1] = ARGV[i + j - 1]
  end
  if ARGV[i + 5] ~= '' then
    args[#args + 1] = 'traceparent'; args[#args + 1] = ARGV[i + 5]
  end
  ids[#ids + 1] = redis.call('XADD', unpack(args))
end
return ids
"""


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack_publish(
    stream: str,
    commands: Sequence[events.Command],
    max_length: int,
    traceparents: Sequence[str] | None = None,
) -> bytes:
    """The RESP bytes of the one ``EVAL`` that adds the commands' events (``_XADD_ALL``;
    with ``traceparents``, one per command, ``_XADD_ALL_TRACED``).

    Built here, not by the client's generic per-argument packing, which cost more CPU than
    the rest of a write's publishing together.
    """
    per_event = 5 if traceparents is None else 6
    parts = [
        b"*%d\r\n" % (5 + per_event * len(commands)),
        _bulk(b"EVAL"),
        _bulk(_XADD_ALL if traceparents is None else _XADD_ALL_TRACED),
        b"$1\r\n1\r\n",
        _bulk(stream.encode()),
        _bulk(str(max_length).encode()),
    ]
    if traceparents is None:
        parts += map(_event_values, commands)
    else:
        for command, traceparent in zip(commands, traceparents, strict=True):
            parts.append(_event_values(command))
            parts.append(_bulk(traceparent.encode()))
    return b"".join(parts)


# The bulk strings of an event's five values, in the order the scripts name them.
_EVENT_BULKS = b"$%d\r\n%s\r\n" * len(_FIELDS)


def _event_values(command: events.Command) -> bytes:
    """The bulk strings of an event's field values (``events.encode``'s, in its order, which
    ``tests/unit/test_stream_packing.py`` holds them to), formatted in one step: per event,
    a dict and ten small bytes objects cost more than its share of the round trip."""
    kind = command.event_type.encode()
    position = b"%d" % command.position
    key = command.key.encode()
    value = command.value.encode()
    created_at = command.created_at.isoformat().encode()
    return _EVENT_BULKS % (
        len(kind),
        kind,
        len(position),
        position,
        len(key),
        key,
        len(value),
        value,
        len(created_at),
        created_at,
    )


def pack_xadds(
    stream: str,
    commands: Sequence[events.Command],
    max_length: int,
    traceparents: Sequence[str] | None = None,
) -> bytes:
    """The RESP bytes of one ``XADD`` per command: the fallback where scripts are refused
    (a non-empty traceparent of ``traceparents`` is its entry's field of that name)."""
    head = [b"XADD", stream.encode()]
    if max_length:
        head += [b"MAXLEN", b"~", str(max_length).encode()]
    body = b"".join(map(_bulk, head)) + b"$1\r\n*\r\n"
    prefix = b"*%d\r\n" % (len(head) + 11) + body
    parts = []
    for index, command in enumerate(commands):
        traceparent = b"" if traceparents is None else traceparents[index].encode()
        parts.append(b"*%d\r\n" % (len(head) + 13) + body if traceparent else prefix)
        for name, value in events.encode(command).items():
            parts += [_bulk(name.encode()), _bulk(value.encode())]
        if traceparent:
            parts += [_bulk(b"traceparent"), _bulk(traceparent)]
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
    redis: Redis,
    stream: str,
    commands: Sequence[events.Command],
    max_length: int,
    traceparents: Sequence[str] | None = None,
) -> list[str]:
    """Add one event per command to the stream in one round trip; return the stream ids.

    ``traceparents`` (TRACING on: one per command, '' for none) adds each entry's trace
    context as its ``traceparent`` field; without it, entries have the event's fields only.

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
            packed = pack_publish(stream, commands, max_length, traceparents)
            reply: Any = await _round_trip(redis, packed, 1)
            return [_id(i) for i in reply[0]]
        except ResponseError as exc:
            if not _refuses_scripts(exc):
                raise
            _Scripts.refused = True
            log.warning("redis refuses EVAL, publishing with one XADD per event error=%s", exc)
    packed = pack_xadds(stream, commands, max_length, traceparents)
    replies = await _round_trip(redis, packed, len(commands))
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


def dead_letter_marks(settings: Settings) -> str:
    """The hash that marks the positions of dead-lettered commands (``added`` or ``dropped``).

    The stream consumer and the catch-up sweep may both find one command refused: the mark
    lets the second of them see that the first dead-lettered it (``dead_letter_once``).
    ``dlq retry`` removes a position's mark with its entry; ``dlq drop`` marks it ``dropped``.
    """
    return dead_letter_marks_of(settings.event_stream_name)


def dead_letter_marks_of(event_stream: str) -> str:
    """The marks hash (``dead_letter_marks``) of the events in ``event_stream``: the one
    spelling of the key, for the services and the operator's ACL rules and teardown alike."""
    return f"{dead_letter_stream_of(event_stream)}:positions"


# The mark of a position whose dead letter is in the dead-letter stream.
_MARK_ADDED = "added"
# Optimistic attempts: the transaction aborts only if another path changed the marks or the
# dead-letter stream between the check and the add (both are written only on dead letters).
_DEAD_LETTER_ATTEMPTS = 16


async def dead_letter_once(
    redis: Redis,
    settings: Settings,
    fields: dict[str, bytes | str],
    *,
    reason: str,
    deliveries: int,
    consumer: str,
    source_id: str = "",
) -> bool:
    """Dead-letter one event (and acknowledge ``source_id`` if given), once per position.

    Returns False, adding nothing, when its command already has a dead letter still in the
    stream or dropped (``dead_letter_marks``). Check and add run under WATCH in one MULTI, so
    two paths dead-lettering one command at once leave one entry between them; no script,
    because an isolated stack's Redis user may not run scripts.
    """
    raw = fields.get("position", "")
    text_position = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    position = text_position if text_position.isdigit() else ""
    letter: dict[str, bytes | str] = {
        **fields,
        "dead_letter_reason": reason[:500],
        "dead_letter_source_id": source_id,
        "dead_letter_deliveries": str(deliveries),
        "dead_letter_consumer": consumer,
    }
    dead, marks = settings.dead_letter_stream, dead_letter_marks(settings)
    for _ in range(_DEAD_LETTER_ATTEMPTS):
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(marks, dead)
                # Any mark (added or dropped) means: dead-lettered already.
                present = bool(position) and await pipe.hexists(marks, position)
                pipe.multi()
                if not present:
                    pipe.xadd(dead, letter)  # type: ignore[arg-type]
                    if position:
                        pipe.hset(marks, position, _MARK_ADDED)
                if source_id:
                    pipe.xack(settings.event_stream_name, settings.consumer_group, source_id)
                await pipe.execute()
            except WatchError:
                continue
        return not present
    raise RedisError(f"dead letter not added: {_DEAD_LETTER_ATTEMPTS} attempts raced others")


async def dead_letter(
    redis: Redis, settings: Settings, entry: Entry, reason: str, consumer: str
) -> bool:
    """Move a poison entry to the dead-letter stream and acknowledge it, in one script.

    Returns False when its command was dead-lettered already (by the catch-up sweep, or by
    another consumer): then the entry is only acknowledged.
    """
    fields: dict[str, bytes | str] = {
        k.decode("utf-8", "replace"): v for k, v in entry.fields.items()
    }
    added = await dead_letter_once(
        redis,
        settings,
        fields,
        reason=reason,
        deliveries=entry.deliveries,
        consumer=consumer,
        source_id=entry.entry_id,
    )
    if added:
        log.warning(
            "event dead-lettered entry=%s deliveries=%d reason=%s",
            entry.entry_id,
            entry.deliveries,
            reason[:200],
        )
    else:
        log.info("event dead-lettered already, acknowledged entry=%s", entry.entry_id)
    return added


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
