"""``records``: each key's current value and counts, served by ``GET /read/{key}`` (DESIGN §4.2).

``value``/``updated_at`` come from the key's newest command *by position* and ``created_at``
from its oldest, so out-of-order delivery is harmless; ``write_count`` is its number of
commands. ``read_count`` counts reads, not commands: a rebuild carries it over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ..events import Command
from .base import Carried, Projection


@dataclass(frozen=True, slots=True)
class RecordState:
    """The projected fields of one key (read_count aside: it counts reads, not commands)."""

    value: str
    created_at: datetime
    updated_at: datetime
    write_count: int


@dataclass(frozen=True, slots=True)
class _Summary:
    """What ``expected`` needs of a key's commands: the oldest, the newest and their count."""

    first: Command
    newest: Command
    count: int


def _by_key(commands: Iterable[Command]) -> dict[str, dict[int, Command]]:
    """The commands of each key by position (a repeat counts once)."""
    by_key: dict[str, dict[int, Command]] = {}
    for command in commands:
        by_key.setdefault(command.key, {})[command.position] = command
    return by_key


class Records(Projection):
    """The original read model: one row per key."""

    name = "records"
    migrations = ("0001_records", "0004_ledger_watermarks")
    tables = ("records", "projector_consumers")
    ledger = "applied_commands"
    carried = Carried("records", "key", "read_count")
    # Values stay out of the aggregate (a CTE or a sort would materialise them, and spill to
    # disk past work_mem): only the newest value of each key is joined in.
    effect = """
        INSERT INTO records AS r (key, value, created_at, updated_at, write_count,
                                  first_command_id, last_command_id)
        SELECT p.key, v.value, p.first_at, p.last_at, p.commands,
               p.first_position, p.last_position
        FROM (SELECT key,
                     count(*) AS commands,
                     min(position) AS first_position,
                     max(position) AS last_position,
                     (array_agg(created_at ORDER BY position))[1] AS first_at,
                     (array_agg(created_at ORDER BY position DESC))[1] AS last_at
              FROM {applied} AS a GROUP BY key) AS p
        JOIN {values} AS v ON v.position = p.last_position
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
    """

    @classmethod
    def expected(cls, commands: Iterable[Command]) -> dict[str, RecordState]:
        """Return the records that the given commands define, whatever their order or repeats."""
        model = {}
        for key, unique in _by_key(commands).items():
            first, newest = unique[min(unique)], unique[max(unique)]
            model[key] = RecordState(newest.value, first.created_at, newest.created_at, len(unique))
        return model

    @classmethod
    def fold(cls, state: Any, commands: Sequence[Command]) -> dict[str, _Summary]:
        """Each key's summary (oldest and newest command, count) with ``commands`` folded in:
        one value per key is held, whatever the length of its history."""
        summaries: dict[str, _Summary] = state if state is not None else {}
        for key, unique in _by_key(commands).items():
            first, newest = unique[min(unique)], unique[max(unique)]
            known = summaries.get(key)
            if known is None:
                summaries[key] = _Summary(first, newest, len(unique))
                continue
            summaries[key] = _Summary(
                first if first.position < known.first.position else known.first,
                newest if newest.position > known.newest.position else known.newest,
                known.count + len(unique),
            )
        return summaries

    @classmethod
    def folded(cls, state: Any) -> dict[str, RecordState]:
        """The records of the commands folded into ``state``: ``expected`` of each key's
        oldest and newest command (the pure function stays the one reference), with the
        key's count of commands."""
        summaries: dict[str, _Summary] = state or {}
        ends = [command for s in summaries.values() for command in (s.first, s.newest)]
        return {
            key: dataclasses.replace(record, write_count=summaries[key].count)
            for key, record in cls.expected(ends).items()
        }

    @classmethod
    async def actual(cls, conn: asyncpg.Connection) -> dict[str, RecordState]:
        """The records as the read DB holds them (read counts aside)."""
        rows = await conn.fetch(
            "SELECT key, value, created_at, updated_at, write_count FROM records"
        )
        return {row[0]: RecordState(row[1], row[2], row[3], int(row[4])) for row in rows}

    @classmethod
    async def actual_for(
        cls, conn: asyncpg.Connection, keys: Sequence[str]
    ) -> dict[str, RecordState]:
        """The records of ``keys`` as the read DB holds them (read counts aside)."""
        rows = await conn.fetch(
            "SELECT key, value, created_at, updated_at, write_count FROM records"
            " WHERE key = ANY($1::text[])",
            list(keys),
        )
        return {row[0]: RecordState(row[1], row[2], row[3], int(row[4])) for row in rows}
