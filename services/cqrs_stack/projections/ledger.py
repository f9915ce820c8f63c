"""Keeping the ledgers small: each model's watermark rises, and its rows below are pruned.

A model's watermark W says "every command at or below W is applied". It may only rise past a
position once no command at or below it can still arrive unapplied, and command ids are drawn
before commit (a transaction open for hours may hold a low id) with gaps (rolled back). So
each round works from a **fence** taken in the write DB: the sequence's last value L, then the
transactions writing ``commands`` at that moment (their locks in ``pg_locks``). Every id at or
below L was drawn by one of them or by a transaction already ended (a writer holds its lock
from before it draws an id until it ends); once none of them is left, every command at or
below L that will ever exist is committed. Then, in steps of at most LEDGER_PRUNE_STEP
positions, W rises to just below the first such command the model has not applied (or to L),
and the ledger rows up to W are deleted, in one short transaction per step.

A batch being applied holds its model's watermark row in KEY SHARE; a step takes it FOR UPDATE,
so it waits for the batches in flight, and a batch begun after it reads the new W: a pruned
command delivered again is filtered by W instead of by its (deleted) ledger row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ..db import driver_connection
from .base import Projection

log = logging.getLogger(__name__)

# Read before the writers (see the module's docstring): ids drawn later are above it. NULL when
# the sequence hands out ids in blocks (CACHE > 1): a session then writes, later, ids at or
# below the last value without holding a lock now, so no fence can be taken.
LAST_ID_SQL = (
    "SELECT CASE WHEN (SELECT seqcache FROM pg_sequence"
    " WHERE seqrelid = 'commands_id_seq'::regclass) > 1 THEN NULL"
    " WHEN is_called THEN last_value ELSE last_value - 1 END FROM commands_id_seq"
)
# The transactions writing ``commands`` now (virtual ids: a fence is closed once none is left).
WRITERS_SQL = (
    "SELECT coalesce(array_agg(virtualtransaction), '{}') FROM pg_locks"
    " WHERE relation = 'commands'::regclass AND mode = 'RowExclusiveLock'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def writers_left_sql(writers: str) -> str:
    """SQL counting the writers of a fence still writing (``writers``: the SQL of its text[]
    of virtual transaction ids), and every prepared transaction writing ``commands``: one of
    the fence's that runs PREPARE TRANSACTION passes its locks to the prepared transaction
    (another virtual id, no pid) and can still commit ids at or below the fence."""
    return (
        "SELECT count(*) FROM pg_locks WHERE relation = 'commands'::regclass"
        f" AND mode = 'RowExclusiveLock' AND (virtualtransaction = ANY({writers}) OR pid IS NULL)"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )


_LAST_ID = text(LAST_ID_SQL)
_WRITERS = text(WRITERS_SQL)
_WRITERS_LEFT = text(writers_left_sql("CAST(:writers AS text[])"))
# Steps of one model in one round at most: a round stays short (a stop waits for it), and a
# backlog is worked off round after round from the same fence.
_STEPS_PER_ROUND = 20
_IDS_IN = text("SELECT id FROM commands WHERE id > :low AND id <= :high ORDER BY id")


@dataclass(frozen=True, slots=True)
class Fence:
    """The write DB's last id drawn, and the transactions that were writing then."""

    position: int
    writers: tuple[str, ...]


def rise_to(low: int, high: int, commands: Sequence[int], applied: set[int]) -> int:
    """The highest W in [low, high] with every command in (low, W] applied."""
    for position in commands:
        if position not in applied:
            return position - 1
    return high


class LedgerPruner:
    """Raises the watermarks of ``projections`` and prunes their ledgers, round by round."""

    def __init__(
        self,
        write_engine: AsyncEngine,
        read_pool: asyncpg.Pool,
        projections: Sequence[type[Projection]],
        step: int,
    ) -> None:
        self.write_engine = write_engine
        self.read_pool = read_pool
        self.projections = tuple(projections)
        self.step = step
        self._fence: Fence | None = None
        # True after a round that left work for the next one (the fence not reached yet).
        self.behind = False
        self._cached_warned = False

    async def prune_round(self) -> int:
        """One round: take a fence, or, once it is closed, raise every watermark towards it
        (at most _STEPS_PER_ROUND steps each; ``behind`` says whether work is left).

        Returns how many ledger rows were pruned.
        """
        self.behind = False
        if self._fence is None:
            self._fence = await self._take_fence()
        if not await self._closed(self._fence):
            return 0
        fence, self._fence = self._fence, None
        pruned = 0
        for projection in self.projections:
            rows, done = await self._raise(projection, fence.position)
            pruned += rows
            if not done:
                self._fence, self.behind = fence, True  # closed already: go on from it
        if pruned:
            log.info("ledger pruned rows=%d up_to=%d", pruned, fence.position)
        return pruned

    async def _take_fence(self) -> Fence:
        async with self.write_engine.connect() as conn:
            last = await conn.scalar(_LAST_ID)
            await conn.commit()  # the writers are looked at after the last id, not with it
            writers = await conn.scalar(_WRITERS)
        if last is None and not self._cached_warned:
            self._cached_warned = True
            log.warning(
                "ledger pruning is off: commands_id_seq hands out ids in blocks (CACHE > 1),"
                " so no command id is known to be complete; ALTER SEQUENCE commands_id_seq"
                " CACHE 1 turns it on"
            )
        return Fence(int(last or 0), tuple(writers or ()))

    async def _closed(self, fence: Fence) -> bool:
        if not fence.writers:
            return True
        async with self.write_engine.connect() as conn:
            left = await conn.scalar(_WRITERS_LEFT, {"writers": list(fence.writers)})
        return not left

    async def _raise(self, projection: type[Projection], fence: int) -> tuple[int, bool]:
        """Raise ``projection``'s watermark towards ``fence`` step by step: rows pruned, and
        whether it is done with this fence (reached, or held by a command not applied)."""
        pruned = 0
        for _ in range(_STEPS_PER_ROUND):
            async with driver_connection(self.read_pool) as conn:
                low = int(
                    await conn.fetchval(f"SELECT position FROM {projection.watermark()}") or 0
                )
            if low >= fence:
                return pruned, True
            step = await self.prune_step(projection, low, min(fence, low + self.step))
            if step is None:
                return pruned, True  # a command not applied yet, or another pruner moved it
            pruned += step
        return pruned, False

    async def prune_step(self, projection: type[Projection], low: int, high: int) -> int | None:
        """Raise the watermark from ``low`` towards ``high`` (a closed fence at most) in one
        transaction; the rows pruned, or None when it could not rise."""
        async with self.write_engine.connect() as wconn:
            found = await wconn.execute(_IDS_IN, {"low": low, "high": high})
            commands = [int(position) for position in found.scalars()]
        async with driver_connection(self.read_pool) as conn:
            rows = await conn.fetch(
                f"SELECT command_id FROM {projection.ledger}"
                " WHERE command_id > $1 AND command_id <= $2",
                low,
                high,
            )
            target = rise_to(low, high, commands, {row[0] for row in rows})
            if target <= low:
                return None
            async with conn.transaction():
                current = await conn.fetchval(
                    f"SELECT position FROM {projection.watermark()} FOR UPDATE"
                )
                if current != low:
                    return None
                deleted = await conn.fetchval(
                    f"WITH gone AS (DELETE FROM {projection.ledger} WHERE command_id <= $1"
                    " RETURNING 1), counted AS (SELECT count(*) AS n FROM gone),"
                    f" moved AS (UPDATE {projection.watermark()} SET position = $1,"
                    " pruned = pruned + (SELECT n FROM counted))"
                    " SELECT n FROM counted",
                    target,
                )
        return int(deleted)
