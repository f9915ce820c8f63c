"""Redis Streams access: publishing events, the consumer group, claiming and dead letters."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

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


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack_xadds(stream: str, commands: Sequence[events.Command], max_length: int) -> bytes:
    """The RESP bytes of one ``XADD`` per command (its event's fields, as ``events.encode``).

    Built here, not by the client's generic per-argument packing: that cost more CPU than the
    rest of a write's publishing together. Same command, same fields, same order.
    """
    head = [b"XADD", stream.encode()]
    if max_length:
        head += [b"MAXLEN", b"~", str(max_length).encode()]
    prefix = b"".join(map(_bulk, head))
    count = b"*%d\r\n" % (len(head) + 11)  # the id "*", then five fields and values
    parts = []
    for command in commands:
        fields = events.encode(command)
        parts.append(count)
        parts.append(prefix)
        parts.append(b"$1\r\n*\r\n")
        for name, value in fields.items():
            parts.append(_bulk(name.encode()))
            parts.append(_bulk(value.encode()))
    return b"".join(parts)


async def publish(
    redis: Redis, stream: str, commands: Sequence[events.Command], max_length: int
) -> list[str]:
    """XADD one event per command in one pipelined round trip; return the stream ids.

    Each command's event is its own XADD (one entry each), sent back to back on one pooled
    connection and answered in order. Every reply is read before an error is raised, so the
    connection never holds an unread reply; a connection cut short (timeout, cancellation)
    is disconnected by the client, never reused half-read. No retry: an event that may have
    been added is left to the unpublished sweep (at worst a duplicate, never a loss).
    """
    if not commands:
        return []
    packed = pack_xadds(stream, commands, max_length)
    pool = redis.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(packed)
        ids: list[str] = []
        first_error: ResponseError | None = None
        for _ in commands:
            try:
                reply = await conn.read_response()
            except ResponseError as exc:
                first_error = first_error or exc
                continue
            ids.append(reply.decode() if isinstance(reply, bytes) else str(reply))
    finally:
        await pool.release(conn)
    if first_error is not None:
        raise first_error
    return ids


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


async def group_info(redis: Redis, stream: str, group: str) -> dict[str, int]:
    """Return pending entries and (on Redis 7) undelivered lag of the group; zeros if absent."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return {"pending": 0, "undelivered": 0, "length": 0}
    length = await redis.xlen(stream)
    for info in groups:
        name = info.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            lag = info.get("lag")
            return {
                "pending": int(info.get("pending", 0)),
                # Redis 6.2 does not report lag; the write DB figures cover it then.
                "undelivered": int(lag) if lag is not None else 0,
                "length": int(length),
            }
    return {"pending": 0, "undelivered": 0, "length": int(length)}


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
