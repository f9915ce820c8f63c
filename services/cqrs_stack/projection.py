"""The projection: how commands become the read model (guarantee 2 lives here).

``project`` is the pure function of DESIGN §4.2 that defines the read model; ``apply_commands``
is its incremental, set-based form in SQL. Exactly-once effect comes from the ledger
``applied_commands``: a command changes ``records`` only in the transaction that inserts its
ledger row, so duplicates, redeliveries, replays and concurrent replicas are no-ops, and
out-of-order arrival is harmless because value and times are chosen by command position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from sqlalchemy import BigInteger, DateTime, String, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from .events import Command


@dataclass(frozen=True, slots=True)
class RecordState:
    """The projected fields of one key (read_count aside: it counts reads, not commands)."""

    value: str
    created_at: datetime
    updated_at: datetime
    write_count: int


def project(commands: Iterable[Command]) -> dict[str, RecordState]:
    """Return the read model that the given commands define, whatever their order or repeats."""
    by_key: dict[str, dict[int, Command]] = {}
    for command in commands:
        by_key.setdefault(command.key, {})[command.position] = command
    model = {}
    for key, unique in by_key.items():
        first, newest = unique[min(unique)], unique[max(unique)]
        model[key] = RecordState(newest.value, first.created_at, newest.created_at, len(unique))
    return model


# The set-based projection of a batch. Placeholders are filled in for SQLAlchemy (:name) or
# for asyncpg ($n); {progress} adds the consumer's progress row to the same statement.
_APPLY_SQL = """
    WITH incoming AS (
        SELECT * FROM unnest({positions}, {keys}, {times}) AS t(position, key, created_at)
    ),
    fresh AS (
        INSERT INTO applied_commands (command_id)
        SELECT position FROM incoming ORDER BY position
        ON CONFLICT DO NOTHING
        RETURNING command_id
    ),
    applied AS (
        SELECT incoming.* FROM incoming JOIN fresh ON fresh.command_id = incoming.position
    ),
    per_key AS (
        SELECT key,
               count(*) AS commands,
               min(position) AS first_position,
               max(position) AS last_position,
               (array_agg(created_at ORDER BY position))[1] AS first_at,
               (array_agg(created_at ORDER BY position DESC))[1] AS last_at
        FROM applied GROUP BY key
    ),
    upserted AS (
        -- Values stay out of the CTEs above (each is materialised, and spills to disk past
        -- work_mem): only the newest value of each key is joined in, from a set-returning
        -- select list that streams instead of materialising.
        INSERT INTO records AS r (key, value, created_at, updated_at, write_count,
                                  first_command_id, last_command_id)
        SELECT p.key, v.value, p.first_at, p.last_at, p.commands,
               p.first_position, p.last_position
        FROM per_key AS p
        JOIN (SELECT unnest({positions}) AS position, unnest({values}) AS value) AS v
            ON v.position = p.last_position
        ORDER BY p.key
        ON CONFLICT (key) DO UPDATE SET
            value = CASE WHEN excluded.last_command_id > r.last_command_id
                         THEN excluded.value ELSE r.value END,
            updated_at = CASE WHEN excluded.last_command_id > r.last_command_id
                              THEN excluded.updated_at ELSE r.updated_at END,
            last_command_id = greatest(r.last_command_id, excluded.last_command_id),
            created_at = CASE WHEN excluded.first_command_id < r.first_command_id
                              THEN excluded.created_at ELSE r.created_at END,
            first_command_id = least(r.first_command_id, excluded.first_command_id),
            write_count = r.write_count + excluded.write_count
        RETURNING 1
    )
    {progress}
    SELECT (SELECT count(*) FROM applied), (SELECT count(*) FROM upserted)
"""

_PROGRESS_CTE = """,
    progress AS (
        INSERT INTO projector_consumers AS c (consumer, events_projected, last_position,
                                              last_event_at)
        SELECT $5, count(*), max(position), max(created_at) FROM applied HAVING count(*) > 0
        ON CONFLICT (consumer) DO UPDATE SET
            events_projected = c.events_projected + excluded.events_projected,
            last_position = greatest(c.last_position, excluded.last_position),
            last_event_at = greatest(c.last_event_at, excluded.last_event_at),
            updated_at = now()
    )"""

_APPLY = text(
    _APPLY_SQL.format(
        positions=":positions", keys=":keys", values=":values", times=":times", progress=""
    )
).bindparams(
    bindparam("positions", type_=ARRAY(BigInteger)),
    bindparam("keys", type_=ARRAY(String)),
    bindparam("values", type_=ARRAY(String)),
    bindparam("times", type_=ARRAY(DateTime(timezone=True))),
)

# The projector's hot path: one statement, so one round trip and its own transaction.
_APPLY_WITH_PROGRESS = _APPLY_SQL.format(
    positions="$1::bigint[]",
    keys="$2::text[]",
    values="$3::text[]",
    times="$4::timestamptz[]",
    progress=_PROGRESS_CTE,
)

_RECORD_PROGRESS = text(
    """
    INSERT INTO projector_consumers AS c (consumer, events_projected, last_position, last_event_at)
    VALUES (:consumer, :applied, :position, :event_at)
    ON CONFLICT (consumer) DO UPDATE SET
        events_projected = c.events_projected + excluded.events_projected,
        last_position = greatest(c.last_position, excluded.last_position),
        last_event_at = greatest(c.last_event_at, excluded.last_event_at),
        updated_at = now()
    """
)


async def apply_commands(conn: AsyncConnection, commands: Sequence[Command], consumer: str) -> int:
    """Apply commands to the read model in the caller's transaction; return how many were new.

    Commands already applied (by anyone, ever) are skipped. The caller commits, and only then
    acknowledges the stream entries.
    """
    unique = {c.position: c for c in commands}  # one delivery per command within a batch
    if not unique:
        return 0
    ordered = [unique[p] for p in sorted(unique)]
    applied, _ = (
        await conn.execute(
            _APPLY,
            {
                "positions": [c.position for c in ordered],
                "keys": [c.key for c in ordered],
                "values": [c.value for c in ordered],
                "times": [c.created_at for c in ordered],
            },
        )
    ).one()
    if applied:
        newest = ordered[-1]
        await conn.execute(
            _RECORD_PROGRESS,
            {
                "consumer": consumer,
                "applied": applied,
                "position": newest.position,
                "event_at": newest.created_at,
            },
        )
    return int(applied)


async def apply_commands_alone(
    conn: asyncpg.Connection, commands: Sequence[Command], consumer: str
) -> int:
    """Apply commands and record ``consumer``'s progress in one statement (its own transaction).

    The same effect as ``apply_commands`` followed by a commit, in one round trip.
    """
    unique = {c.position: c for c in commands}
    if not unique:
        return 0
    ordered = [unique[p] for p in sorted(unique)]
    applied, _ = await conn.fetchrow(
        _APPLY_WITH_PROGRESS,
        [c.position for c in ordered],
        [c.key for c in ordered],
        [c.value for c in ordered],
        [c.created_at for c in ordered],
        consumer,
    )
    return int(applied)
