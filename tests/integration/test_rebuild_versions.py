"""Blue/green rebuilds on real servers: the progress record of a run, the version of each
read model, verification before the swap, and the previous version kept for rollback."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from cqrs_stack.db import driver_of
from cqrs_stack.projections.history import History
from cqrs_stack.projections.records import Records
from cqrs_stack.rebuild import rebuild
from cqrs_stack.rebuild_progress import RunProgress, latest_run, live_versions, read_run
from tests.fixtures.stack import Stack
from tests.integration.test_rebuild import rebuild_command, seed


@asynccontextmanager
async def read_conn(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """A driver connection to the stack's read DB (autocommit)."""
    async with stack.read_engine.connect() as session:
        yield await driver_of(session)


async def test_a_run_records_its_progress_through_the_phases(stack: Stack) -> None:
    """Each record of the run (as the writer returns it) moves load → catch-up → swap → done,
    with done never above total; at the end done = total = the commands, and the version
    built is the live one (default: live + 1)."""
    await seed(stack, 3000, 100)
    seen: list[RunProgress] = []
    count = await rebuild(
        stack.write_engine,
        stack.read_engine,
        stack.settings,
        seen.append,
        (Records, History),
        run_id="run-1",
    )
    assert count == 3000
    phases = [run.phase for run in seen]
    assert phases[0] == "load" and phases[-1] == "done", phases
    order = ["load", "catch-up", "verify", "swap", "done"]
    assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases), phases
    assert {"load", "catch-up", "swap", "done"} <= set(phases)
    assert all(run.done <= run.total for run in seen if run.phase != "done")
    async with read_conn(stack) as conn:
        run = await read_run(conn, "run-1")
        assert run is not None and run == await latest_run(conn)
        assert (run.phase, run.done, run.total, run.version) == ("done", 3000, 3000, 2)
        assert run.models == ("records", "history")
        assert run.finished_at is not None and run.error is None
        assert run.percent == 100.0 and run.eta_seconds == 0.0
        assert await read_run(conn, "no-such-run") is None
        versions = await live_versions(conn)
    assert versions["records"] == versions["history"] == 2


async def test_the_cli_records_its_run_id_and_version_and_one_model_moves_alone(
    stack: Stack,
) -> None:
    """``--run-id`` and ``--version`` name the run and the version built; ``--model`` moves
    only that model's version. A run left working by a process that died is marked failed by
    the next one."""
    await seed(stack, 500, 50)
    async with read_conn(stack) as conn:
        await conn.execute(
            "INSERT INTO rebuild_runs (run_id, models, version, phase)"
            " VALUES ('dead', '{records}', 2, 'load')"
        )
    args, env = rebuild_command(stack, READ_MODELS="records,history")
    done = subprocess.run(
        [*args, "--run-id", "job-7", "--version", "7", "--model", "history"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "done" in done.stderr and "100%" in done.stderr  # the bar shows the record
    async with read_conn(stack) as conn:
        run = await read_run(conn, "job-7")
        dead = await read_run(conn, "dead")
        versions = await live_versions(conn)
    assert run is not None and (run.phase, run.version, run.models) == ("done", 7, ("history",))
    assert dead is not None and dead.phase == "failed" and dead.error
    assert versions["history"] == 7 and versions["records"] == 1
