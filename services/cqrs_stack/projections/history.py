"""``history``: every command of a key, served newest first by ``GET /read/{key}/history``.

An audit trail kept in the read DB, so paging through it never scans the write DB: one row
per command, keyed (key, position), which is also the index a page is read from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ..events import Command
from .base import Projection


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One command of a key, as its history shows it."""

    event_type: str
    value: str
    created_at: datetime


class History(Projection):
    """One row per command, by key and position."""

    name = "history"
    migrations = ("0005_history",)
    tables = ("history",)
    ledger = "history_applied"
    effect = """
        INSERT INTO history (key, position, event_type, value, created_at)
        SELECT a.key, a.position, a.event_type, v.value, a.created_at
        FROM {applied} AS a JOIN {values} AS v ON v.position = a.position
        ON CONFLICT DO NOTHING
    """

    @classmethod
    def expected(cls, commands: Iterable[Command]) -> dict[tuple[str, int], HistoryEntry]:
        """Every command once, by (key, position)."""
        return {
            (c.key, c.position): HistoryEntry(c.event_type, c.value, c.created_at) for c in commands
        }

    @classmethod
    async def actual(cls, conn: asyncpg.Connection) -> dict[tuple[str, int], HistoryEntry]:
        """The history rows the read DB holds."""
        rows = await conn.fetch("SELECT key, position, event_type, value, created_at FROM history")
        return {(r[0], int(r[1])): HistoryEntry(r[2], r[3], r[4]) for r in rows}

    @classmethod
    async def actual_for(
        cls, conn: asyncpg.Connection, keys: Sequence[str]
    ) -> dict[tuple[str, int], HistoryEntry]:
        """The history rows of ``keys``."""
        rows = await conn.fetch(
            "SELECT key, position, event_type, value, created_at FROM history"
            " WHERE key = ANY($1::text[])",
            list(keys),
        )
        return {(r[0], int(r[1])): HistoryEntry(r[2], r[3], r[4]) for r in rows}


# A page: newest first, below the cursor; one row more than asked tells whether another follows.
PAGE = (
    "SELECT position, event_type, value, created_at FROM history"
    " WHERE key = $1 AND position < $2 ORDER BY position DESC LIMIT $3"
)
