"""Blue/green rebuilds on real servers: the progress record of a run, the version of each
read model, verification before the swap, and the previous version kept for rollback."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from cqrs_stack import cli
from cqrs_stack.db import driver_of
from cqrs_stack.events import Command
from cqrs_stack.projections.history import History
from cqrs_stack.projections.records import Records, RecordState
from cqrs_stack.rebuild import RebuildError, rebuild
from cqrs_stack.rebuild_progress import RunProgress, latest_run, live_versions, read_run
from cqrs_stack.verify import sampled_keys
from tests.fixtures.stack import Stack, wait_until
from tests.integration.test_guarantees import write_many
from tests.integration.test_rebuild import Traffic, rebuild_command, run_rebuild, seed


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


async def test_a_run_prunes_the_finished_runs_but_the_newest_kept(stack: Stack) -> None:
    """REBUILD_RUNS_KEPT=2 and three finished runs before (one past the bound) plus one a dead
    process left working: the run keeps the two newest finished ones besides itself (the dead
    one is recorded failed first), and the next run again."""
    await seed(stack, 100, 10)
    async with read_conn(stack) as conn:
        for age, run_id, phase in (
            (40, "old-1", "done"),
            (30, "old-2", "failed"),
            (20, "old-3", "done"),
            (10, "dead", "load"),
        ):
            await conn.execute(
                "INSERT INTO rebuild_runs (run_id, models, version, phase, started_at)"
                " VALUES ($1, '{records}', 2, $2, now() - make_interval(mins => $3))",
                run_id,
                phase,
                age,
            )
    settings = stack.settings.model_copy(update={"rebuild_runs_kept": 2})
    await rebuild(stack.write_engine, stack.read_engine, settings, run_id="new")
    async with read_conn(stack) as conn:
        rows = await conn.fetch("SELECT run_id, phase FROM rebuild_runs ORDER BY started_at")
        assert [(r[0], r[1]) for r in rows] == [
            ("old-3", "done"),
            ("dead", "failed"),
            ("new", "done"),
        ]
    await rebuild(stack.write_engine, stack.read_engine, settings, run_id="newer")
    async with read_conn(stack) as conn:
        kept = [
            r[0] for r in await conn.fetch("SELECT run_id FROM rebuild_runs ORDER BY started_at")
        ]
    assert kept == ["dead", "new", "newer"]


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
    for bad in (["--version", "0"], ["--rollback", "--version", "3"]):
        refused = subprocess.run([*args, *bad], env=env, capture_output=True, text=True)
        assert refused.returncode == 2, refused.stderr  # EXIT_CONFIG


def _planting(key: str) -> Callable[..., Any]:
    """Records.expected with one key's value wrong: the shadow differs from it there only."""
    original = Records.expected.__func__  # type: ignore[attr-defined]

    def expected(cls: type[Records], commands: Iterable[Command]) -> dict[str, RecordState]:
        model = dict(original(cls, commands))
        if key in model:
            model[key] = dataclasses.replace(model[key], value="planted")
        return model

    return expected


@pytest.mark.parametrize("sample", ["0", "100"])  # every key; a sample of all 100 keys
async def test_a_verify_failure_leaves_the_live_model_and_exits_non_zero(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, sample: str
) -> None:
    """A model whose pure function differs from its statement for one key fails the rebuild
    before the swap: exit 1, the run failed naming that key, live tables and version as they
    were, the shadow dropped."""
    await seed(stack, 1000, 100)
    run_rebuild(stack)
    async with read_conn(stack) as conn:
        await conn.execute("UPDATE records SET value = 'live' WHERE key = 'seed:42'")
    monkeypatch.setattr(Records, "expected", classmethod(_planting("seed:42")))
    for name, value in {**stack.env, "REBUILD_VERIFY_SAMPLE": sample}.items():
        monkeypatch.setenv(name, value)
    code = await asyncio.to_thread(cli.main, ["rebuild", "--run-id", "bad"])
    assert code == 1
    async with read_conn(stack) as conn:
        run = await read_run(conn, "bad")
        assert run is not None and run.phase == "failed" and run.error is not None
        assert "'seed:42'" in run.error and "verify" in run.error, run.error
        assert await conn.fetchval("SELECT value FROM records WHERE key = 'seed:42'") == "live"
        assert (await live_versions(conn))["records"] == 2
        assert await conn.fetchval("SELECT to_regnamespace('cqrs_rebuild')") is None


async def test_verify_samples_at_most_its_setting(stack: Stack) -> None:
    """The keys verified: REBUILD_VERIFY_SAMPLE of them at most (every key when fewer), or
    all with 0, in pages of at most 500."""
    await seed(stack, 300, 100)
    async with stack.write_engine.connect() as session:
        wconn = await driver_of(session)
        pages = [page async for page in sampled_keys(wconn, 1)]
        every = [page async for page in sampled_keys(wconn, 0)]
        more = [page async for page in sampled_keys(wconn, 1000)]
    assert [len(p) for p in pages] == [1]
    assert sorted(k for p in every for k in p) == sorted(f"seed:{i}" for i in range(100))
    assert max(len(p) for p in every) <= 500 and sum(len(p) for p in more) == 100


async def _records_oid(stack: Stack) -> int:
    return int(await stack.scalar(stack.read_engine, "SELECT 'records'::regclass::oid"))


async def _read(url: str, key: str, times: int, position: int | None = None) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(times):
            params = {} if position is None else {"position": position, "timeout": 1}
            answer = await client.get(f"/read/{key}", params=params)
            assert answer.status_code == 200, answer.text
            assert position is None or answer.json()["position_reached"] is True


async def test_rollback_swaps_the_previous_version_back_with_what_came_since(
    stack: Stack,
) -> None:
    """After a rebuild, commands written (and reads counted) since its swap are in the live
    version only; ``--rollback``, under writes that go on, swaps the previous version's own
    tables back in, caught up: every command exactly once, every read counted, a position
    written after the swap still reached. The version replaced is kept in turn."""
    api = await stack.launch("api")
    await stack.launch("projector")
    await write_many(api.url, 300, keys=30)
    await stack.assert_converges()
    await _read(api.url, "k1", 3)
    first = await _records_oid(stack)
    run_rebuild(stack)
    assert await _records_oid(stack) != first
    since = await write_many(api.url, 200, prefix="new", keys=20)  # new keys: new rows
    await write_many(api.url, 60, keys=30)  # updates of old keys
    await _read(api.url, "k1", 4)
    await _read(api.url, "new3", 5)
    await stack.assert_converges()
    await wait_until(lambda: _reads_stored(stack, {"k1": 7, "new3": 5}), 10, "reads stored")
    traffic = Traffic(api.url, ["k2"])
    stopping = asyncio.Event()
    writing = asyncio.create_task(traffic.write_loop(stopping))
    try:
        args, env = rebuild_command(stack)
        done = await asyncio.to_thread(
            subprocess.run,
            [*args, "--rollback", "--run-id", "back"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stopping.set()
        await writing
    assert done.returncode == 0, done.stderr
    assert "previous version swapped back in" in done.stdout
    assert not traffic.failures, traffic.failures[:5]
    assert await _records_oid(stack) == first  # the previous version's own table
    await stack.assert_converges()  # write_count = commands: each applied exactly once
    await wait_until(lambda: _reads_stored(stack, {"k1": 7, "new3": 5}), 10, "reads kept")
    await _read(api.url, "new7", 1, position=max(a["position"] for a in since))
    async with read_conn(stack) as conn:
        run = await read_run(conn, "back")
        assert run is not None and (run.phase, run.version) == ("rolled-back", 1)
        row = await conn.fetchrow(
            "SELECT version, previous_version, previous_kept_until > now() + interval '50 min'"
            " FROM read_model_versions WHERE model = 'records'"
        )
    assert tuple(row) == (1, 2, True)


async def _reads_stored(stack: Stack, expected: dict[str, int]) -> bool:
    for key, count in expected.items():
        stored = await stack.scalar(
            stack.read_engine, "SELECT read_count FROM records WHERE key = :k", k=key
        )
        if stored != count:
            return False
    return True


async def _previous_tables(stack: Stack) -> int:
    return int(
        await stack.scalar(
            stack.read_engine, "SELECT count(*) FROM pg_tables WHERE schemaname = 'cqrs_previous'"
        )
    )


async def test_an_expired_previous_version_is_dropped_by_the_projector(stack: Stack) -> None:
    """Kept REBUILD_KEEP_PREVIOUS_SECONDS, then dropped by the projectors' housekeeping (every
    LEDGER_PRUNE_INTERVAL); a rollback after that fails, exit 1, nothing changed. With 0 it is
    dropped at the swap."""
    await seed(stack, 500, 50)
    run_rebuild(stack, REBUILD_KEEP_PREVIOUS_SECONDS="0")
    assert await _previous_tables(stack) == 0
    run_rebuild(stack, REBUILD_KEEP_PREVIOUS_SECONDS="5")
    assert await _previous_tables(stack) == len(Records.version_tables())
    await stack.launch("projector", LEDGER_PRUNE_INTERVAL="0.2")
    await wait_until(lambda: _no_previous(stack), 20, "the expired version to be dropped")
    # Not before its time (rounds every 0.2 s ran for seconds before it).
    assert await stack.scalar(
        stack.read_engine,
        "SELECT bool_and(now() >= r.finished_at + interval '5 s') FROM rebuild_runs r"
        " WHERE r.finished_at = (SELECT max(finished_at) FROM rebuild_runs)",
    )
    async with read_conn(stack) as conn:
        row = await conn.fetchrow(
            "SELECT version, previous_version, previous_kept_until FROM read_model_versions"
        )
    assert tuple(row) == (3, None, None)
    args, env = rebuild_command(stack)
    refused = subprocess.run([*args, "--rollback"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "no previous version of records" in refused.stderr
    await stack.assert_converges(timeout=5)


async def _no_previous(stack: Stack) -> bool:
    return await _previous_tables(stack) == 0


LOCK_TIMEOUT = 0.2
# What a reader may wait beyond REBUILD_LOCK_TIMEOUT: the moves between schemas and the
# swap's commit (a WAL flush, on two shared cores).
LOCK_MARGIN = 0.3


async def test_readers_wait_on_the_swap_at_most_its_lock_timeout(stack: Stack) -> None:
    """A rebuild while reads and writes go on (and the projector projects): no error, and no
    reader's lock (ACCESS SHARE, as PostgreSQL reports its wait) waits longer than
    REBUILD_LOCK_TIMEOUT plus the margin; the operator's view of the run (read_run, polled)
    moves forward through the phases to done."""
    await seed(stack, 100_000, 10_000)
    run_rebuild(stack)
    api = await stack.launch("api")
    await stack.launch("projector")
    await write_many(api.url, 40, prefix="live:", keys=20)
    await stack.assert_converges()
    traffic = Traffic(api.url, ["seed:7", "seed:4321", "live:3"])
    stopping = asyncio.Event()
    loops = [asyncio.create_task(traffic.read_loop(stopping, n)) for n in range(3)]
    loops.append(asyncio.create_task(traffic.write_loop(stopping)))
    longest_wait = 0.0
    phases: list[str] = []
    try:
        await wait_until(lambda: _more_than(traffic, 20), 20, "reads to flow")
        args, env = rebuild_command(stack, REBUILD_LOCK_TIMEOUT=str(LOCK_TIMEOUT))
        process = await asyncio.create_subprocess_exec(
            *args, "--run-id", "watched", env=env, stderr=asyncio.subprocess.PIPE
        )
        async with read_conn(stack) as conn:
            for _ in range(20_000):  # bounded: 20 ms apart, the rebuild takes seconds
                wait = await conn.fetchval(
                    "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - waitstart)), 0)"
                    " FROM pg_locks WHERE NOT granted AND mode = 'AccessShareLock'"
                )
                longest_wait = max(longest_wait, float(wait))
                run = await read_run(conn, "watched")
                if run is not None and (not phases or phases[-1] != run.phase):
                    phases.append(run.phase)
                if process.returncode is not None or (run is not None and run.finished):
                    break
                await asyncio.sleep(0.02)
        _, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
    finally:
        stopping.set()
        await asyncio.gather(*loops)
    print(f"longest reader lock wait {longest_wait:.3f}s; phases {phases}")
    assert not traffic.failures, traffic.failures[:10]
    assert longest_wait <= LOCK_TIMEOUT + LOCK_MARGIN
    order = ["load", "catch-up", "verify", "swap", "done"]
    assert phases[-1] == "done" and [order.index(p) for p in phases] == sorted(
        order.index(p) for p in phases
    ), phases
    await stack.assert_converges()


async def _more_than(traffic: Traffic, reads: int) -> bool:
    return traffic.reads > reads


async def test_sigterm_cancels_a_rebuild_and_leaves_the_live_model(stack: Stack) -> None:
    """SIGTERM (a Job deleted) while the swap waits for its locks: exit 130, the run recorded
    as cancelled, the live model and version as they were, the shadow dropped."""
    await seed(stack, 2000, 100)
    run_rebuild(stack)
    async with read_conn(stack) as conn:
        await conn.execute("UPDATE records SET value = 'live' WHERE key = 'seed:7'")
    args, env = rebuild_command(stack, REBUILD_SWAP_ATTEMPTS="10000")
    async with read_conn(stack) as holder, read_conn(stack) as conn:
        async with holder.transaction():
            # Writers' lock: the swap's EXCLUSIVE waits behind it, readers do not.
            await holder.execute("LOCK TABLE records IN ROW EXCLUSIVE MODE")
            process = await asyncio.create_subprocess_exec(
                *args, "--run-id", "stopped", env=env, stderr=asyncio.subprocess.PIPE
            )

            async def swapping() -> bool:
                run = await read_run(conn, "stopped")
                return run is not None and run.phase == "swap"

            await wait_until(swapping, 60, "the rebuild to reach its swap")
            process.terminate()
            _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 130, err.decode()
        run = await read_run(conn, "stopped")
        assert run is not None and run.phase == "cancelled" and run.finished_at is not None
        assert await conn.fetchval("SELECT value FROM records WHERE key = 'seed:7'") == "live"
        assert (await live_versions(conn))["records"] == 2
        assert await conn.fetchval("SELECT to_regnamespace('cqrs_rebuild')") is None


async def test_the_next_rebuild_drops_an_expired_previous_version_even_if_it_fails(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expired previous version goes at the next rebuild's start: one that then fails
    (verification, here) leaves none kept, and a rollback is refused."""
    await seed(stack, 500, 50)
    run_rebuild(stack, REBUILD_KEEP_PREVIOUS_SECONDS="1")
    assert await _previous_tables(stack) == len(Records.version_tables())

    async def expired() -> bool:
        return bool(
            await stack.scalar(
                stack.read_engine,
                "SELECT previous_kept_until <= now() FROM read_model_versions",
            )
        )

    await wait_until(expired, 10, "the previous version to expire")
    monkeypatch.setattr(Records, "expected", classmethod(_planting("seed:3")))
    with pytest.raises(RebuildError, match="verify"):
        await rebuild(stack.write_engine, stack.read_engine, stack.settings)
    assert await _previous_tables(stack) == 0
    async with read_conn(stack) as conn:
        assert await conn.fetchval("SELECT previous_version FROM read_model_versions") is None
