"""The stack's figures: counts, publishing and projection lag, from the databases and Redis.

One place computes them for ``/stats``, ``/metrics`` and ``cqrs-stack status``, so that every
view agrees. Figures come from durable state, not from one process's memory, so any replica
of any API reports the same numbers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import read_db, stream, write_db
from .config import Settings


async def stack_figures(
    write_engine: AsyncEngine, read_engine: AsyncEngine, redis: Redis, settings: Settings
) -> dict[str, Any]:
    """Return the figures of the original /stats plus lag; Redis being down is reported."""
    written = await write_db.counts(write_engine, settings.stats_exact_count_max)
    projected = await read_db.projector_figures(read_engine, settings.stats_exact_count_max)
    try:
        # Bounded: a hung Redis (accepts, never answers) is reported as unavailable, not waited
        # on for a socket timeout.
        async with asyncio.timeout(settings.redis_timeout):
            group = await stream.group_info(
                redis, settings.event_stream_name, settings.consumer_group
            )
            dead = await redis.xlen(settings.dead_letter_stream)
        redis_up = True
    except (RedisError, OSError):  # TimeoutError is an OSError
        group, dead, redis_up = {"pending": 0, "undelivered": 0, "length": 0}, 0, False
    estimated = bool(
        written["commands_estimated"]
        or projected["records_estimated"]
        or projected["applied_commands_estimated"]
    )
    if written["commands_estimated"] or projected["applied_commands_estimated"]:
        # Two estimates differ by more than the lag: positions say how far projection is.
        lag_events = max(0, written["max_position"] - projected["last_projected_position"])
    else:
        lag_events = max(0, written["commands"] - projected["applied_commands"])
    last_at = projected["last_projected_event_at"]
    lag_seconds = 0.0
    if lag_events and last_at is not None:
        lag_seconds = max(0.0, (dt.datetime.now(dt.UTC) - last_at).total_seconds())
    return {
        "write_db_pool_size": settings.db_pool_max_size,
        "read_db_pool_size": settings.db_pool_max_size,
        "events_published": written["commands"] - written["unpublished"],
        "events_queued": written["unpublished"],
        "events_projected": projected["events_projected"],
        "read_db_records": projected["records"],
        "write_db_records": written["commands"],
        "last_written_position": written["max_position"],
        "last_projected_position": projected["last_projected_position"],
        "lag_events": lag_events,
        "lag_seconds": round(lag_seconds, 3),
        "stream_length": group["length"],
        "pending_entries": group["pending"],
        "undelivered_entries": group["undelivered"],
        "dead_letters": int(dead),
        "redis_available": redis_up,
        "counts_estimated": estimated,
    }
