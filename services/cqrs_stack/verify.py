"""Checking each read model against the write DB: the invariant of DESIGN §4.2.

For every model, what the read DB holds is compared with its pure function
(``Projection.expected``) of the write DB's commands.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import asyncpg
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


# Keys compared per round trip when verifying a sample: bounds the commands held at once.
_SAMPLE_PAGE = 500
# Command sizes listed per round trip when a model is verified whole (its pages follow).
_SIZES_PAGE = 10_000
# Choosing the sample reads every key of the write DB once: a bulk step's bound.
_SAMPLE_TIMEOUT = 3600.0


async def sampled_keys(wconn: asyncpg.Connection, sample: int) -> AsyncIterator[list[str]]:
    """Pages of the write DB's keys: ``sample`` of them chosen at random (each key as likely),
    or every key when ``sample`` is 0, in pages of at most _SAMPLE_PAGE.

    The keys are those of ``commands`` itself (its key index), not of a table derived from
    it. The random choice is PostgreSQL's top-N sort (``ORDER BY random() LIMIT``), so only the
    sample itself is ever held here.
    """
    if sample > 0:
        rows = await wconn.fetch(
            "SELECT key FROM (SELECT DISTINCT key FROM commands) AS k ORDER BY random() LIMIT $1",
            sample,
            timeout=_SAMPLE_TIMEOUT,
        )
        keys = [row[0] for row in rows]
        for start in range(0, len(keys), _SAMPLE_PAGE):
            yield keys[start : start + _SAMPLE_PAGE]
        return
    after = ""
    while True:
        rows = await wconn.fetch(
            "SELECT DISTINCT key FROM commands WHERE key > $1 ORDER BY key LIMIT $2",
            after,
            _SAMPLE_PAGE,
        )
        if not rows:
            return
        yield [row[0] for row in rows]
        after = rows[-1][0]


async def pages_by_bytes(
    wconn: asyncpg.Connection, keys: Sequence[str], max_bytes: int
) -> list[list[str]]:
    """``keys`` split so that the commands of each part weigh at most ``max_bytes`` (keys and
    values; a key heavier than that alone), so comparing a part holds about that much."""
    rows = await wconn.fetch(
        "SELECT key, sum(octet_length(key) + octet_length(value)) FROM commands"
        " WHERE key = ANY($1::text[]) GROUP BY key ORDER BY key",
        list(keys),
    )
    pages: list[list[str]] = []
    used = max_bytes + 1
    for key, size in rows:
        if used + size > max_bytes:
            pages.append([])
            used = 0
        pages[-1].append(key)
        used += size
    return pages


async def keys_differences(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    models: Sequence[type[Projection]],
    keys: Sequence[str],
    max_bytes: int | None = None,
) -> list[str]:
    """How the models ``rconn`` reads differ, for ``keys``, from their pure function of the
    commands of those keys that they applied (their ledgers say which).

    The caller points ``rconn``'s search_path at the version to check (a rebuild's shadow).
    The commands are read and folded into each model's summary (``Projection.fold``) in pages
    of at most ``max_bytes`` (keys and values; one command larger makes a page alone), so a key
    with a long history of large values is never held whole.
    """
    sizes = await wconn.fetch(
        "SELECT id, octet_length(key) + octet_length(value) FROM commands"
        " WHERE key = ANY($1::text[]) ORDER BY id",
        list(keys),
    )
    states: dict[str, Any] = {}
    per_key = [m for m in models if await m.actual_for(rconn, []) is not None]
    for page in _pages([(row[0], row[1]) for row in sizes], max_bytes):
        commands = await _commands(wconn, page)
        for model in per_key:
            held = await _held(rconn, model, commands)
            states[model.name] = model.fold(states.get(model.name), held)
    found: list[str] = []
    for model in per_key:  # a model not per key is verified whole (whole_differences)
        actual = await model.actual_for(rconn, keys)
        assert actual is not None
        found += compare(model.name, model.folded(states.get(model.name)), actual)
    return found


async def _commands(wconn: asyncpg.Connection, ids: Sequence[int]) -> list[Command]:
    """The commands of ``ids``, in order of position (one page: its size is the caller's)."""
    rows = await wconn.fetch(
        "SELECT id, key, value, event_type, created_at FROM commands"
        " WHERE id = ANY($1::bigint[]) ORDER BY id",
        list(ids),
    )
    return [Command(*row) for row in rows]


def _pages(sizes: Sequence[tuple[int, int]], max_bytes: int | None) -> list[list[int]]:
    """Command ids split into pages of at most ``max_bytes`` (None: one page)."""
    pages: list[list[int]] = []
    used = 0
    for command_id, size in sizes:
        if not pages or (max_bytes is not None and used + size > max_bytes and pages[-1]):
            pages.append([])
            used = 0
        pages[-1].append(command_id)
        used += size
    return pages


async def whole_differences(
    wconn: asyncpg.Connection,
    rconn: asyncpg.Connection,
    model: type[Projection],
    max_bytes: int,
) -> list[str]:
    """How ``model`` as ``rconn`` reads it differs from its pure function of every command it
    applied: for a model whose entries combine several keys (``actual_for`` is None).

    The write DB's commands are read in order of position, in pages of at most ``max_bytes``
    (keys and values; one command larger makes a page alone; at most _SIZES_PAGE sizes listed
    at once), and each page's applied ones folded into the model's state (``Projection.fold``):
    what is held is one page and that state, whatever the size of the write DB (the default
    ``fold`` keeps every command; a model that folds into a summary holds the summary).
    """
    state: Any = None
    after = 0
    while True:
        sizes = await wconn.fetch(
            "SELECT id, octet_length(key) + octet_length(value) FROM commands"
            " WHERE id > $1 ORDER BY id LIMIT $2",
            after,
            _SIZES_PAGE,
        )
        if not sizes:
            break
        after = sizes[-1][0]
        for page in _pages([(row[0], row[1]) for row in sizes], max_bytes):
            commands = await _commands(wconn, page)
            state = model.fold(state, await _held(rconn, model, commands))
            del commands
        del sizes
    return compare(model.name, model.folded(state), await model.actual(rconn))


async def _held(
    rconn: asyncpg.Connection, model: type[Projection], commands: list[Command]
) -> list[Command]:
    """Of ``commands``, those ``model`` has applied (its ledger and watermark say)."""
    # The ledger's key index for the positions given (= ANY), not a test per position: the
    # planner hashes a whole unanalysed ledger for the latter.
    rows = await rconn.fetch(
        f"SELECT command_id FROM {model.ledger} WHERE command_id = ANY($1::bigint[])",
        [c.position for c in commands],
    )
    mark = int(await rconn.fetchval(f"SELECT coalesce(max(position), 0) FROM {model.watermark()}"))
    applied = {row[0] for row in rows}
    return [c for c in commands if c.position <= mark or c.position in applied]
