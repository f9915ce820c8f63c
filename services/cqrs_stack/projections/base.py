"""The ``Projection`` interface: what a read model is, and the one way each is applied.

A read model is a class with a name, the read-DB migrations that create its tables, its
``effect`` (one set-based SQL statement over the commands newly applied) and its pure
``expected`` function (the reference ``verify`` compares with). Everything else is common and
lives here, so a model's SQL is written once:

- **exactly once, on its own**: each model has its own ledger table (``ledger``: one row per
  command it applied above its watermark) and watermark (``<ledger>_watermark``: every command
  at or below ``position`` is applied). A command changes the model only in the transaction
  that inserts its ledger row, so duplicates, redeliveries, replays and concurrent replicas
  change nothing, and a model can be rebuilt alone. Rows below the watermark are pruned
  (``projections.ledger``), so the ledger stays small.
- **applied as a batch**: ``apply_batch`` applies commands to every given model in one
  statement, hence one read-DB transaction and one round trip.
- **rebuilt from the write DB**: ``rebuild`` copies the commands into a staging table beside
  the live model and runs the same ``effect`` over it (``effect_over``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import asyncpg

from ..db import row_count_sql
from ..events import Command

# Per-consumer progress figures (/stats): counted from the first model of a batch (records).
PROGRESS_TABLE = "projector_consumers"

# What an effect reads: {applied} has the columns (position, key, event_type, created_at) of the
# commands this statement applies for the first time; {values} has (position, value) of at
# least those. Values stay out of {applied}: only the values a model needs are joined in.
_BATCH_VALUES = "(SELECT unnest($1::bigint[]) AS position, unnest($3::text[]) AS value)"


@dataclass(frozen=True, slots=True)
class Carried:
    """State of a model that commands do not define (e.g. read counts), kept across a rebuild:
    ``column`` of ``table`` is copied from the live rows to the new ones by ``key``."""

    table: str
    key: str
    column: str


class Projection(ABC):
    """A read model fed by the commands. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    # Read-DB migration files (without .sql) that create its tables, ledger and watermark.
    migrations: ClassVar[tuple[str, ...]]
    # Its model tables: with the ledger and watermark, one version that a rebuild swaps.
    tables: ClassVar[tuple[str, ...]]
    ledger: ClassVar[str]
    # One data-modifying SQL statement over {applied} and {values} (see above).
    effect: ClassVar[str]
    carried: ClassVar[Carried | None] = None

    registry: ClassVar[dict[str, type[Projection]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete model; abstract helpers may omit it
            Projection.registry[cls.name] = cls

    @classmethod
    def watermark(cls) -> str:
        """The table of its watermark: one row, every command at or below ``position`` applied."""
        return f"{cls.ledger}_watermark"

    @classmethod
    def version_tables(cls) -> tuple[str, ...]:
        """Every table of one version of the model, as a rebuild builds and swaps them."""
        return (*cls.tables, cls.ledger, cls.watermark())

    @classmethod
    @abstractmethod
    def expected(cls, commands: Iterable[Command]) -> Mapping[Any, Any]:
        """The pure function: what the model holds for these commands, whatever their order
        or repeats (the reference for ``verify``)."""

    @classmethod
    def fold(cls, state: Any, commands: Sequence[Command]) -> Any:
        """``state`` (None at first) with one more page of commands folded in: pages of
        distinct commands, in any order, so that ``folded`` of the pages is ``expected`` of
        them all. The default keeps every command; a model overrides it to hold less (a
        key's summary), so that verifying a key with a long history holds one page at once."""
        return [*(state or ()), *commands]

    @classmethod
    def folded(cls, state: Any) -> Mapping[Any, Any]:
        """``expected`` of every command folded into ``state`` (``fold``)."""
        return cls.expected(state or ())

    @classmethod
    @abstractmethod
    async def actual(cls, conn: asyncpg.Connection) -> Mapping[Any, Any]:
        """What the read DB holds, in the shape of ``expected``."""

    @classmethod
    async def actual_for(
        cls, conn: asyncpg.Connection, keys: Sequence[str]
    ) -> Mapping[Any, Any] | None:
        """What the read DB holds that the commands of ``keys`` alone define, in the shape of
        ``expected`` (what a rebuild verifies for a sample of keys); None for a model whose
        entries combine several keys (the default), which is then verified whole."""
        return None

    @classmethod
    def effect_over(cls, applied: str, values: str) -> str:
        """The effect statement reading the given relations (SQL text of each)."""
        return cls.effect.format(applied=applied, values=values)

    @classmethod
    def applied_test(cls, position: str, schema: str = "") -> str:
        """SQL truth of "the command at ``position`` is applied" (watermark or ledger row)."""
        prefix = f"{schema}." if schema else ""
        return (
            f"({position} <= coalesce((SELECT position FROM {prefix}{cls.watermark()}), 0)"
            f" OR EXISTS (SELECT 1 FROM {prefix}{cls.ledger} l WHERE l.command_id = {position}))"
        )


def _apply_ctes(projection: type[Projection]) -> str:
    # CTE names carry a double underscore, which no table of ours has.
    name = projection.name
    return f""",
    {name}__mark AS (
        -- KEY SHARE: the ledger's pruning (FOR UPDATE) waits for this batch, and a batch
        -- begun after it reads the new watermark (so a pruned row is never re-inserted).
        SELECT position FROM {projection.watermark()} FOR KEY SHARE
    ),
    {name}__fresh AS (
        INSERT INTO {projection.ledger} (command_id)
        SELECT position FROM incoming
        WHERE position > coalesce((SELECT position FROM {name}__mark), 0)
        ORDER BY position
        ON CONFLICT DO NOTHING
        RETURNING command_id
    ),
    {name}__new AS (
        SELECT incoming.* FROM incoming
        JOIN {name}__fresh ON {name}__fresh.command_id = incoming.position
    ),
    {name}__effect AS ({projection.effect_over(f"{name}__new", _BATCH_VALUES)})"""


def _progress_cte(projection: type[Projection]) -> str:
    return f""",
    progress AS (
        INSERT INTO {PROGRESS_TABLE} AS c (consumer, events_projected, last_position,
                                          last_event_at)
        SELECT $6, count(*), max(position), max(created_at) FROM {projection.name}__new
        HAVING count(*) > 0
        ON CONFLICT (consumer) DO UPDATE SET
            events_projected = c.events_projected + excluded.events_projected,
            last_position = greatest(c.last_position, excluded.last_position),
            last_event_at = greatest(c.last_event_at, excluded.last_event_at),
            updated_at = now()
    )"""


@cache
def apply_statement(projections: tuple[type[Projection], ...], progress: bool) -> str:
    """The statement that applies a batch to ``projections`` (and, with ``progress``, counts
    it for consumer $6 from the first one). Parameters: positions, keys, values, event types,
    times."""
    ctes = "".join(_apply_ctes(p) for p in projections)
    if progress:
        ctes += _progress_cte(projections[0])
    counts = ", ".join(f"(SELECT count(*) FROM {p.name}__new)" for p in projections)
    return f"""
    WITH incoming AS (
        SELECT * FROM unnest($1::bigint[], $2::text[], $4::text[], $5::timestamptz[])
            AS t(position, key, event_type, created_at)
    ),
    -- Never read: types the values for a statement whose models do not need them.
    typed AS (SELECT $3::text[]){ctes}
    SELECT {counts}
    """


async def apply_batch(
    conn: asyncpg.Connection,
    projections: Sequence[type[Projection]],
    commands: Sequence[Command],
    consumer: str | None,
) -> dict[str, int]:
    """Apply ``commands`` to each model in one statement; return how many each found new.

    Outside a transaction the statement is its own; inside one, the caller commits (and only
    then acknowledges the stream entries). A command a model applied before (by anyone, ever)
    is skipped by that model. With ``consumer``, its progress row counts the first model's.
    """
    unique = {c.position: c for c in commands}  # one delivery per command within a batch
    if not unique or not projections:
        return dict.fromkeys((p.name for p in projections), 0)
    ordered = [unique[p] for p in sorted(unique)]
    statement = apply_statement(tuple(projections), consumer is not None)
    args: list[object] = [
        [c.position for c in ordered],
        [c.key for c in ordered],
        [c.value for c in ordered],
        [c.event_type for c in ordered],
        [c.created_at for c in ordered],
    ]
    if consumer is not None:
        args.append(consumer)
    row = await conn.fetchrow(statement, *args)
    assert row is not None
    return {p.name: int(n) for p, n in zip(projections, row, strict=True)}


async def position_applied(
    conn: asyncpg.Connection, projection: type[Projection], position: int
) -> bool:
    """Has ``projection`` applied the command at ``position``?"""
    return bool(await conn.fetchval(f"SELECT {projection.applied_test('$1::bigint')}", position))


async def not_applied(
    conn: asyncpg.Connection, projections: Sequence[type[Projection]], positions: Sequence[int]
) -> list[int]:
    """Of ``positions``, those that at least one of ``projections`` has not applied, sorted."""
    if not projections or not positions:
        return []
    lacking = " OR ".join(f"NOT {p.applied_test('p')}" for p in projections)
    rows = await conn.fetch(
        f"SELECT p FROM unnest($1::bigint[]) AS p WHERE {lacking} ORDER BY p", list(positions)
    )
    return [row[0] for row in rows]


async def applied_count(conn: asyncpg.Connection, projection: type[Projection]) -> int:
    """How many commands ``projection`` has applied, counted exactly whatever the ledger's
    size (``progress`` estimates a large ledger)."""
    return (await progress(conn, projection, exact_max=2**62)).applied


@dataclass(frozen=True)
class Progress:
    """How far a projection has got, as its ledger and watermark say."""

    applied: int  # commands applied: the pruned ledger rows and those left
    estimated: bool  # the ledger's rows were the planner's estimate (more than exact_max)
    last_position: int  # the highest position applied (0 when none)
    watermark: int  # every command at or below it applied
    ledger_rows: int  # rows left above the watermark (estimated when ``estimated``)


async def progress(
    conn: asyncpg.Connection, projection: type[Projection], exact_max: int
) -> Progress:
    """``projection``'s progress in one statement. The ledger is pruned below its watermark,
    but right after a bulk load or a rebuild's swap it holds a row per command until the
    pruning catches up: its rows are counted exactly up to ``exact_max`` and estimated above
    (``db.row_count_sql``), so that reading the figures never costs a scan of millions."""
    row = await conn.fetchrow(
        f"SELECT coalesce(w.position, 0), coalesce(w.pruned, 0), l.n, l.estimated,"
        f" coalesce((SELECT max(command_id) FROM {projection.ledger}), 0)"
        f" FROM ({row_count_sql(projection.ledger, '$1')}) AS l"
        f" LEFT JOIN {projection.watermark()} AS w ON true",
        exact_max,
    )
    watermark, pruned, rows, estimated, highest = row
    return Progress(
        applied=int(pruned) + int(rows),
        estimated=bool(estimated),
        last_position=max(int(watermark), int(highest)),
        watermark=int(watermark),
        ledger_rows=int(rows),
    )
