"""Checking the read model against the write DB: the invariant of DESIGN §4.2."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .events import Command
from .projection import RecordState, project


async def expected_model(write_engine: AsyncEngine) -> dict[str, RecordState]:
    """The read model that the write DB's commands define (the pure function)."""
    async with write_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id, key, value, event_type, created_at FROM commands")
        )
        return project(Command(*row) for row in rows)


async def actual_model(read_engine: AsyncEngine) -> dict[str, RecordState]:
    """The read model as the read DB holds it (read counts aside)."""
    async with read_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT key, value, created_at, updated_at, write_count FROM records")
        )
        return {row[0]: RecordState(row[1], row[2], row[3], int(row[4])) for row in rows}


async def differences(write_engine: AsyncEngine, read_engine: AsyncEngine) -> list[str]:
    """Describe every way the read model differs from the write DB; empty when it matches."""
    expected = await expected_model(write_engine)
    actual = await actual_model(read_engine)
    found = []
    for key in sorted(expected.keys() - actual.keys()):
        found.append(f"missing key {key!r}")
    for key in sorted(actual.keys() - expected.keys()):
        found.append(f"unexpected key {key!r}")
    for key in sorted(expected.keys() & actual.keys()):
        if expected[key] != actual[key]:
            found.append(f"key {key!r}: expected {expected[key]}, found {actual[key]}")
    return found
