"""The stack's figures: counts, publishing and projection lag, from the databases and Redis.

One place computes them for ``/stats``, ``/metrics`` and ``cqrs-stack status``, so that every
view agrees. Figures come from durable state, not from one process's memory, so any replica
of any API reports the same numbers.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from . import diagnosis, read_db, write_db
from .config import Settings


async def stack_figures(
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    redis: Redis,
    settings: Settings,
    health: diagnosis.Diagnosis | None = None,
) -> dict[str, Any]:
    """Return the figures of the original /stats plus lag; Redis being down is reported.

    The stream's figures come from ``health`` (diagnosis.py: one reading of the group for
    every view), read here when not given.
    """
    # Bounded like the diagnosis's readings: a server that accepts and never answers raises
    # TimeoutError (an OSError: a 503 at the API's edge) instead of holding the caller.
    written = await diagnosis.within(write_db.counts(write_engine, settings.stats_exact_count_max))
    projected = await diagnosis.within(
        read_db.projector_figures(read_engine, settings.stats_exact_count_max)
    )
    if health is None:
        # Bounded: a hung Redis (accepts, never answers) is reported as unavailable, not
        # waited on for a socket timeout.
        group = await diagnosis.read_stream(
            redis,
            settings.event_stream_name,
            settings.consumer_group,
            settings.projector_stopped_after,
            settings.redis_timeout,
        )
        dead = await diagnosis.read_dead_letters(
            redis, settings.dead_letter_stream, settings.redis_timeout
        )
    else:
        group, dead = health.stream, health.dead_letters
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
        "stream_length": group.length,
        "pending_entries": group.pending,
        "undelivered_entries": group.undelivered,
        "dead_letters": dead.count if dead is not None else 0,
        "redis_available": group.reachable,
        "counts_estimated": estimated,
    }
