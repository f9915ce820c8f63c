"""Checking each read model against the write DB: the invariant of DESIGN §4.2.

For every model, what the read DB holds is compared with its pure function
(``Projection.expected``) of the write DB's commands.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import driver_of
from .events import Command
from .projections import Projection
from .projections.records import Records


async def write_db_commands(write_engine: AsyncEngine) -> list[Command]:
    """Every command of the write DB."""
    async with write_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id, key, value, event_type, created_at FROM commands")
        )
        return [Command(*row) for row in rows]


async def actual_model(read_engine: AsyncEngine, model: type[Projection]) -> Mapping[Any, Any]:
    """``model`` as the read DB holds it."""
    async with read_engine.connect() as conn:
        return await model.actual(await driver_of(conn))


def compare(name: str, expected: Mapping[Any, Any], actual: Mapping[Any, Any]) -> list[str]:
    """Every way ``actual`` differs from ``expected``, one line each, prefixed by the model."""
    found = [f"{name}: missing key {key!r}" for key in sorted(expected.keys() - actual.keys())]
    found += [f"{name}: unexpected key {key!r}" for key in sorted(actual.keys() - expected.keys())]
    for key in sorted(expected.keys() & actual.keys()):
        if expected[key] != actual[key]:
            found.append(f"{name}: key {key!r}: expected {expected[key]}, found {actual[key]}")
    return found


async def differences(
    write_engine: AsyncEngine,
    read_engine: AsyncEngine,
    models: Sequence[type[Projection]] = (Records,),
) -> list[str]:
    """Describe every way the read models differ from the write DB; empty when they match."""
    commands = await write_db_commands(write_engine)
    found: list[str] = []
    for model in models:
        found += compare(
            model.name, model.expected(commands), await actual_model(read_engine, model)
        )
    return found
