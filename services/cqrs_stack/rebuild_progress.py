"""The progress of rebuilds, as the read DB records it: what ``cqrs-stack rebuild`` shows and
what the operator reads into a stack's status.

A run is one row of ``rebuild_runs`` (read-DB migration 0007): its models, the version it
builds, its phase (``load``, ``catch-up``, ``verify``, ``swap`` while it works; ``done``,
``failed``, ``cancelled`` or ``rolled-back`` at its end), commands done of the total known so
far, and when it started, last moved and ended. ``read_model_versions`` holds the version of
each model that is live, and the one kept for rollback.

The rebuild writes its row through ``ProgressWriter``, on a connection of its own (never in
the swap's transaction, so it holds none of the swap's locks), at most every
``ProgressWriter.interval`` seconds while counting and at once at every change of phase.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

import asyncpg

from .stack_spec import INITIAL_READ_MODEL_VERSION

log = logging.getLogger(__name__)

WORKING: Final = ("load", "catch-up", "verify", "swap")
# The working phases before the swap: nothing of a run in one of them is live.
BEFORE_SWAP: Final = WORKING[: WORKING.index("swap")]
FINISHED: Final = ("done", "failed", "cancelled", "rolled-back")
PHASES: Final = (*WORKING, *FINISHED)
# The version a model's migrations create: a model without a row in read_model_versions.
INITIAL_VERSION: Final = INITIAL_READ_MODEL_VERSION

_COLUMNS = "run_id, models, version, phase, done, total, started_at, updated_at, finished_at, error"


@dataclass(frozen=True, slots=True)
class RunProgress:
    """One rebuild run as recorded: where it is, how fast it goes, when it should end."""

    run_id: str
    models: tuple[str, ...]
    version: int
    phase: str
    done: int
    total: int
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    error: str | None

    @property
    def finished(self) -> bool:
        """Has the run ended (whichever way)?"""
        return self.phase in FINISHED

    @property
    def percent(self) -> float:
        """Commands done of the total known so far, 0-100 (100 once done)."""
        if self.phase == "done" or self.total <= 0:
            return 100.0 if self.phase == "done" else 0.0
        return min(100.0, 100.0 * self.done / self.total)

    @property
    def rate(self) -> float | None:
        """Commands per second from the start to the last update; None before any moved."""
        elapsed = (self.updated_at - self.started_at).total_seconds()
        if self.done <= 0 or elapsed <= 0:
            return None
        return self.done / elapsed

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far (0 once finished); None while the rate is unknown."""
        if self.finished:
            return 0.0
        rate = self.rate
        if rate is None:
            return None
        return max(0, self.total - self.done) / rate


def _run_of(row: asyncpg.Record) -> RunProgress:
    return RunProgress(
        run_id=row["run_id"],
        models=tuple(row["models"]),
        version=int(row["version"]),
        phase=row["phase"],
        done=int(row["done"]),
        total=int(row["total"]),
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        error=row["error"],
    )


async def read_run(conn: asyncpg.Connection, run_id: str) -> RunProgress | None:
    """The run ``run_id`` as last recorded; None when there is none."""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM rebuild_runs WHERE run_id = $1", run_id)
    return None if row is None else _run_of(row)


async def latest_run(conn: asyncpg.Connection) -> RunProgress | None:
    """The run started last; None when no rebuild ever ran."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM rebuild_runs ORDER BY started_at DESC, run_id DESC LIMIT 1"
    )
    return None if row is None else _run_of(row)


async def live_versions(conn: asyncpg.Connection) -> dict[str, int]:
    """The live version of each model: recorded by its last swap, INITIAL_VERSION before any.

    Every registered model is present (its tables exist once migrated), plus any recorded one.
    """
    from .projections import registered

    found = dict.fromkeys(registered(), INITIAL_VERSION)
    for row in await conn.fetch("SELECT model, version FROM read_model_versions"):
        found[row[0]] = int(row[1])
    return found


async def kept_versions(conn: asyncpg.Connection) -> dict[str, int]:
    """The version each model's last swap replaced, kept for rollback (recorded ones only)."""
    rows = await conn.fetch(
        "SELECT model, previous_version FROM read_model_versions WHERE previous_version IS NOT NULL"
    )
    return {row[0]: int(row[1]) for row in rows}


def swap_outcome(run: RunProgress, live: dict[str, int], kept: dict[str, int]) -> str | None:
    """What the live versions say of ``run``'s swap: ``done`` (or ``rolled-back``: the version
    it replaced, now kept, is the newer) once its version is live for every model of it, else
    None (not committed, or not yet). A rebuild's version is above the live one until its swap
    and a rollback's is the kept one, so its version live means its swap committed."""
    if not run.models or any(live.get(model) != run.version for model in run.models):
        return None
    if any(kept.get(model, -1) > run.version for model in run.models):
        return "rolled-back"
    return "done"


async def rebuild_figures(conn: asyncpg.Connection) -> dict[str, object]:
    """What ``cqrs-stack status`` shows of rebuilds: each model's live version, and the last
    run as recorded; one recorded at its swap also says whether the live versions show that
    swap committed (``swap_committed``: a run lost in its COMMIT is settled so by the next)."""
    live = await live_versions(conn)
    run = await latest_run(conn)
    last: dict[str, object] | None = None
    if run is not None:
        last = {
            "run_id": run.run_id,
            "models": list(run.models),
            "version": run.version,
            "phase": run.phase,
            "percent": round(run.percent, 1),
            "started_at": run.started_at.isoformat(),
            "finished_at": None if run.finished_at is None else run.finished_at.isoformat(),
            "error": run.error,
        }
        if run.phase == "swap":
            last["swap_committed"] = swap_outcome(run, live, await kept_versions(conn)) is not None
    return {"live_versions": live, "last_run": last}


async def settle_lost_runs(conn: asyncpg.Connection, run_id: str) -> list[RunProgress]:
    """Record as ended the runs but ``run_id`` recorded as working: their process was stopped
    or lost (the caller holds the rebuild's lock, so none works). One lost in its swap's COMMIT
    (a failover cut every session: it could not tell) is settled from the live versions: done
    (or rolled-back) when its version is live, else failed with the live model unchanged.
    Returns the runs as now recorded, each logged."""
    lost = [
        _run_of(row)
        for row in await conn.fetch(
            f"SELECT {_COLUMNS} FROM rebuild_runs WHERE phase = ANY($1::text[]) AND run_id <> $2",
            list(WORKING),
            run_id,
        )
    ]
    if not lost:
        return []
    live, kept = await live_versions(conn), await kept_versions(conn)
    settled: list[RunProgress] = []
    for run in lost:
        outcome = swap_outcome(run, live, kept) if run.phase == "swap" else None
        if outcome is not None:
            phase, error = (
                outcome,
                (
                    f"the rebuild's process was lost after its swap committed: version"
                    f" {run.version} is live (settled by run {run_id})"
                ),
            )
        elif run.phase == "swap":
            phase, error = (
                "failed",
                (
                    "the rebuild's process was lost during its swap, which did not commit: the"
                    f" live model is unchanged (settled by run {run_id})"
                ),
            )
        else:
            phase = "failed"
            error = "the rebuild ended without finishing (its process was stopped or lost)"
        row = await conn.fetchrow(
            "UPDATE rebuild_runs SET phase = $2, error = $3, finished_at = now(),"
            " updated_at = now(), done = CASE WHEN $2 = 'failed' THEN done"
            " ELSE greatest(done, total) END, total = greatest(done, total)"
            f" WHERE run_id = $1 AND phase = ANY($4::text[]) RETURNING {_COLUMNS}",
            run.run_id,
            phase,
            error,
            list(WORKING),
        )
        if row is None:
            continue
        log.warning(
            "rebuild run_id=%s was lost at phase %s: recorded %s (%s)",
            run.run_id,
            run.phase,
            phase,
            error,
        )
        settled.append(_run_of(row))
    return settled


def new_run_id() -> str:
    """A fresh run id: the UTC time it started and a random suffix (sortable, unique)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class ProgressWriter:
    """Records one run's progress in ``rebuild_runs`` and tells ``listener`` each record.

    ``conn`` is the writer's own connection (autocommit): each record is its own short
    statement, outside the rebuild's transactions. Counting (``advance``) is recorded at most
    every ``interval`` seconds; a change of phase and the end at once. Failing to record
    progress is logged, never fails the rebuild (its start aside).
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        run_id: str,
        models: Sequence[str],
        version: int,
        listener: Callable[[RunProgress], None] | None = None,
        interval: float = 1.0,
    ) -> None:
        self.conn = conn
        self.run_id = run_id
        self.models = list(models)
        self.version = version
        self.listener = listener
        self.interval = interval
        self.phase = "load"
        self.done = 0
        self.total = 0
        self.last: RunProgress | None = None
        self._recorded_at = -float("inf")
        # Wall seconds of each step of the run (``timed``), in the order first timed: what a
        # run's end logs, so one run shows where its time went.
        self.steps: dict[str, float] = {}

    @property
    def finished(self) -> bool:
        """Has the run been recorded as ended?"""
        return self.phase in FINISHED

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Add the wall seconds of the block to ``steps[step]`` (however it ends)."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.steps[step] = self.steps.get(step, 0.0) + time.monotonic() - started

    async def start(self, phase: str = "load") -> RunProgress:
        """Record the run at ``phase``, after settling the runs that died midway
        (``settle_lost_runs``).

        Called with the rebuild's lock held: no other run is working, so a run recorded as
        working has ended without saying so. Starting again a run id that exists (a retried
        Job) starts it over.
        """
        await settle_lost_runs(self.conn, self.run_id)
        row = await self.conn.fetchrow(
            "INSERT INTO rebuild_runs (run_id, models, version, phase) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (run_id) DO UPDATE SET models = excluded.models,"
            " version = excluded.version, phase = excluded.phase, done = 0, total = 0,"
            " started_at = now(), updated_at = now(), finished_at = NULL, error = NULL"
            f" RETURNING {_COLUMNS}",
            self.run_id,
            self.models,
            self.version,
            phase,
        )
        assert row is not None
        self.phase = phase
        self._recorded_at = time.monotonic()
        return self._told(_run_of(row))

    async def prune(self, kept: int) -> int:
        """Delete the finished runs but the newest ``kept`` (REBUILD_RUNS_KEPT); return how
        many. Called with the rebuild's lock held, after ``start``: this run is among them."""
        try:
            status = await self.conn.execute(
                "DELETE FROM rebuild_runs WHERE run_id IN (SELECT run_id FROM rebuild_runs"
                " WHERE phase = ANY($1::text[]) AND run_id <> $2"
                " ORDER BY started_at DESC, run_id DESC OFFSET $3)",
                list(FINISHED),
                self.run_id,
                kept,
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            log.warning("old rebuild runs not pruned run_id=%s error=%s", self.run_id, exc)
            return 0
        return int(status.rpartition(" ")[2])

    async def refused(self, error: str) -> None:
        """Record a run that could not start (another rebuild holds the lock), unless its id
        is already recorded (it may be that other run's)."""
        await self._record_safely(
            "INSERT INTO rebuild_runs (run_id, models, version, phase, finished_at, error)"
            " VALUES ($1, $2, $3, 'failed', now(), $4) ON CONFLICT (run_id) DO NOTHING"
            f" RETURNING {_COLUMNS}",
            self.run_id,
            self.models,
            self.version,
            error,
        )

    async def advance(self, done: int, total: int | None = None) -> None:
        """Count ``done`` commands (of ``total`` when given); recorded at most every interval."""
        self.done = done
        if total is not None:
            self.total = total
        if time.monotonic() - self._recorded_at >= self.interval:
            await self._update()

    async def enter(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        """Move to ``phase`` (recorded at once)."""
        if phase not in WORKING:
            raise ValueError(f"unknown working phase {phase!r}: expected one of {WORKING}")
        self.phase = phase
        self.done = self.done if done is None else done
        self.total = self.total if total is None else total
        await self._update()

    async def finish(self, phase: str, error: str | None = None) -> None:
        """End the run as ``phase`` (done, failed, cancelled, rolled-back), with ``error``."""
        if phase not in FINISHED:
            raise ValueError(f"unknown final phase {phase!r}: expected one of {FINISHED}")
        self.phase = phase
        if phase in ("done", "rolled-back"):
            self.done = self.total = max(self.done, self.total)
        await self._record_safely(
            "UPDATE rebuild_runs SET phase = $2, done = $3, total = $4, error = $5,"
            f" updated_at = now(), finished_at = now() WHERE run_id = $1 RETURNING {_COLUMNS}",
            self.run_id,
            phase,
            self.done,
            self.total,
            error,
        )

    async def _update(self) -> None:
        self._recorded_at = time.monotonic()
        await self._record_safely(
            "UPDATE rebuild_runs SET phase = $2, done = $3, total = $4, updated_at = now()"
            f" WHERE run_id = $1 RETURNING {_COLUMNS}",
            self.run_id,
            self.phase,
            self.done,
            self.total,
        )

    async def _record_safely(self, statement: str, *args: object) -> None:
        try:
            row = await self.conn.fetchrow(statement, *args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            log.warning("rebuild progress not recorded run_id=%s error=%s", self.run_id, exc)
            # The listener still learns the phase the run is in (a stop's verdict rests on it:
            # a swap begun must never be told as not begun because its record failed).
            if self.last is not None:
                self._told(replace(self.last, phase=self.phase, done=self.done, total=self.total))
            return
        if row is not None:
            self._told(_run_of(row))

    def _told(self, run: RunProgress) -> RunProgress:
        self.last = run
        if self.listener is not None:
            self.listener(run)
        return run
