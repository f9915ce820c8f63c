"""Rebuilds and rollbacks stopped at their worst moments, on real servers: a rollback killed
before its swap, a stop after the swap committed (also while its clean-up waits on a read DB
that hangs), a command the read DB refuses, a stop before anything started, and verify's
memory with one key heavier than its bound."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from cqrs_stack.cli import _STOP_WITHIN
from cqrs_stack.config import plain_database_url
from cqrs_stack.db import driver_of
from cqrs_stack.localservers import PostgresServer, RedisServer, free_port
from cqrs_stack.projections.records import Records
from cqrs_stack.rebuild import RebuildError, rebuild
from cqrs_stack.rebuild_progress import live_versions, read_run
from cqrs_stack.verify import whole_differences
from tests.fixtures.stack import Stack, open_stack, wait_until
from tests.integration.test_cli import cqrs_stack
from tests.integration.test_rebuild import rebuild_command, run_rebuild, seed
from tests.integration.test_rebuild_versions import _planting
from tests.integration.test_rebuild_watermark import held_write


@asynccontextmanager
async def read_conn(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """A driver connection to the stack's read DB (autocommit)."""
    async with stack.read_engine.connect() as session:
        yield await driver_of(session)


async def _records_oid(conn: asyncpg.Connection, schema: str = "public") -> int | None:
    oid = await conn.fetchval(f"SELECT to_regclass('{schema}.records')::oid")
    return None if oid is None else int(oid)


async def _moves_waiting(
    conn: asyncpg.Connection, process: asyncio.subprocess.Process, timeout: float = 120
) -> int:
    """Wait until the rebuild ``process``'s swap waits for its moves' lock (ACCESS EXCLUSIVE
    on the live records, held off by a reader of the test's); the pid of that session."""
    found: list[int] = []

    async def waits() -> bool:
        assert process.returncode is None, "the rebuild ended before its swap"
        pid = await conn.fetchval(
            "SELECT pid FROM pg_locks WHERE mode = 'AccessExclusiveLock'"
            " AND NOT granted AND relation = 'public.records'::regclass"
        )
        if pid is not None:
            found.append(int(pid))
        return pid is not None

    await wait_until(waits, timeout, "the swap to wait for its moves' lock")
    return found[-1]


async def _unlocked(conn: asyncpg.Connection) -> bool:
    """No session holds the rebuild's lock (a killed client's ends once its wait does)."""
    return not await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")


async def test_a_rollback_killed_before_its_swap_keeps_the_previous_version(
    stack: Stack,
) -> None:
    """SIGKILL once the rollback moved the previous version into the shadow: the next
    rollback finds it kept again and swaps it in; the dead run is recorded failed."""
    await seed(stack, 500, 50)
    async with read_conn(stack) as conn:
        first = await _records_oid(conn)
    run_rebuild(stack)
    args, env = rebuild_command(stack)
    async with read_conn(stack) as holder, read_conn(stack) as conn:
        async with holder.transaction():
            # The rollback's catch-up waits on the live table: caught in the shadow.
            await holder.execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
            process = await asyncio.create_subprocess_exec(
                *args, "--rollback", "--run-id", "killed", env=env
            )

            async def in_shadow() -> bool:
                return await _records_oid(conn, "cqrs_rebuild") == first

            await wait_until(in_shadow, 60, "the previous version to move into the shadow")
            process.kill()
            await asyncio.wait_for(process.wait(), 30)
        await wait_until(lambda: _unlocked(conn), 30, "the killed run's session to end")
        assert await _records_oid(conn, "cqrs_previous") is None  # stranded, so far
    again = subprocess.run(
        [*args, "--rollback", "--run-id", "again"], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert "previous version swapped back in" in again.stdout
    async with read_conn(stack) as conn:
        assert await _records_oid(conn) == first
        assert (await live_versions(conn))["records"] == 1
        killed = await read_run(conn, "killed")
        assert killed is not None and killed.phase == "failed", killed
        assert await conn.fetchval("SELECT to_regnamespace('cqrs_rebuild')") is None
    await stack.assert_converges()


async def test_a_rebuild_after_a_killed_rollback_does_not_drop_the_previous_version(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next rebuild gives the stranded previous version back before it drops the shadow:
    one failing (its verification, here) leaves it kept for a rollback."""
    await seed(stack, 500, 50)
    async with read_conn(stack) as conn:
        first = await _records_oid(conn)
    run_rebuild(stack)
    args, env = rebuild_command(stack)
    async with read_conn(stack) as holder, read_conn(stack) as conn:
        async with holder.transaction():
            await holder.execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
            process = await asyncio.create_subprocess_exec(*args, "--rollback", env=env)

            async def in_shadow() -> bool:
                return await _records_oid(conn, "cqrs_rebuild") == first

            await wait_until(in_shadow, 60, "the previous version to move into the shadow")
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.wait(), 30)
        await wait_until(lambda: _unlocked(conn), 30, "the killed run's session to end")
    monkeypatch.setattr(Records, "expected", classmethod(_planting("seed:3")))
    with pytest.raises(RebuildError, match="verify"):
        await rebuild(stack.write_engine, stack.read_engine, stack.settings)
    async with read_conn(stack) as conn:
        assert await _records_oid(conn, "cqrs_previous") == first
        assert await conn.fetchval("SELECT to_regnamespace('cqrs_rebuild')") is None
    monkeypatch.undo()
    back = subprocess.run([*args, "--rollback"], env=env, capture_output=True, text=True)
    assert back.returncode == 0, back.stderr
    async with read_conn(stack) as conn:
        assert await _records_oid(conn) == first


_MIB = 1024 * 1024
# README: a rebuild's memory is about 90 MB plus 1.2 x REBUILD_BATCH_MAX_BYTES (measured
# here: 88 MiB with one value of 1 MiB, 90 MiB with a hundred of one key).
_BASE_RSS = 90 * _MIB


def _peak_rss(args: list[str], env: dict[str, str]) -> tuple[int, int, str]:
    """Exit code, peak RSS in bytes and stderr of ``args`` run as the only child of a fresh
    process (so its RUSAGE_CHILDREN is that run's alone)."""
    probe = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(done.returncode, peak * 1024, flush=True)\n"
        "sys.stderr.write(done.stderr)\n"
    )
    done = subprocess.run(
        [args[0], "-c", probe, *args], env=env, capture_output=True, text=True, timeout=300
    )
    code, peak = done.stdout.split()
    return int(code), int(peak), done.stderr


async def test_verify_holds_one_page_of_a_key_whose_history_is_past_the_bound(
    stack: Stack,
) -> None:
    """One key with 100 values of 1 MiB (100 MiB, 25 times the bound of 4 MiB), every key
    verified: the run's peak memory stays within 90 MB + 1.2 x REBUILD_BATCH_MAX_BYTES."""
    await seed(stack, 20, 10)
    async with stack.write_engine.begin() as session:
        conn = await driver_of(session)
        await conn.execute(
            "INSERT INTO commands (key, value, event_type, published)"
            " SELECT 'heavy', repeat(md5(i::text), 32768) || i, 'RecordUpdated', true"
            " FROM generate_series(1, 100) AS i"
        )
    bound = 4 * _MIB
    args, env = rebuild_command(
        stack, REBUILD_VERIFY_SAMPLE="0", REBUILD_BATCH_MAX_BYTES=str(bound)
    )
    code, peak, err = await asyncio.to_thread(_peak_rss, args, env)
    assert code == 0, err
    assert peak <= _BASE_RSS + 1.2 * bound, f"peak RSS {peak / _MIB:.0f} MiB"
    async with read_conn(stack) as conn:
        row = await conn.fetchrow("SELECT write_count, value FROM records WHERE key = 'heavy'")
    assert row is not None and row[0] == 100 and row[1].endswith("100")


class _WholeRecords(Records):
    """``records`` as a model across keys would be verified: whole, not per key (no name of
    its own, so not registered)."""

    @classmethod
    async def actual_for(cls, conn: asyncpg.Connection, keys: Sequence[str]) -> None:
        return None


async def test_a_model_verified_whole_holds_one_page_of_the_write_db(stack: Stack) -> None:
    """120 values of 1 MiB over 3 keys (120 MiB, 30 times the bound of 4 MiB) verified whole:
    the Python heap's peak is one page of commands, the fold's state (the first and newest
    command of each key: 6 MiB) and the model's rows (3 MiB), far below the write DB; and a
    difference is still found."""
    await seed(stack, 20, 10)
    async with stack.write_engine.begin() as session:
        conn = await driver_of(session)
        await conn.execute(
            "INSERT INTO commands (key, value, event_type, published)"
            " SELECT 'heavy' || (i % 3), repeat(md5(i::text), 32768) || i, 'RecordUpdated', true"
            " FROM generate_series(1, 120) AS i"
        )
    await rebuild(stack.write_engine, stack.read_engine, stack.settings)
    bound = 4 * _MIB
    async with stack.write_engine.connect() as session, read_conn(stack) as rconn:
        wconn = await driver_of(session)
        tracemalloc.start()
        try:
            found = await whole_differences(wconn, rconn, _WholeRecords, bound)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert found == []
        # Measured: 10.5 MiB (124.6 MiB when every command was held at once).
        assert peak <= 4 * bound, f"peak {peak / _MIB:.1f} MiB"
        await rconn.execute("UPDATE records SET write_count = 41 WHERE key = 'heavy1'")
        found = await whole_differences(wconn, rconn, _WholeRecords, bound)
    assert len(found) == 1 and "'heavy1'" in found[0], found


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_after_the_swap_committed_reports_the_swap(
    stack: Stack, stop: signal.Signals
) -> None:
    """SIGTERM or SIGINT (Ctrl-C) while the post-swap DROP of the shadow waits on a lock:
    exit 0, the swap reported and recorded done, the clean-up left to the next run (which
    does it)."""
    await seed(stack, 500, 50)
    args, env = rebuild_command(stack, REBUILD_SWAP_ATTEMPTS="10000")
    async with (
        read_conn(stack) as writers,
        read_conn(stack) as blocker,
        read_conn(stack) as conn,
    ):
        blocking = blocker.transaction()
        await blocking.start()
        try:
            async with writers.transaction():
                # The swap waits behind the writers' lock until the shadow's blocker is there.
                await writers.execute("LOCK TABLE records IN ROW EXCLUSIVE MODE")
                process = await asyncio.create_subprocess_exec(
                    *args, "--run-id", "late", env=env, stderr=asyncio.subprocess.PIPE
                )

                async def phase_is(phase: str) -> bool:
                    run = await read_run(conn, "late")
                    return run is not None and run.phase == phase

                await wait_until(lambda: phase_is("swap"), 60, "the rebuild to reach its swap")
                # A table being created in the shadow: the DROP SCHEMA after the swap waits.
                await blocker.execute("CREATE TABLE cqrs_rebuild.blocker (i int)")

            async def dropping() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE 'DROP SCHEMA%'"
                    )
                )

            await wait_until(dropping, 60, "the post-swap DROP to wait on its lock")
            assert await phase_is("done")
            process.send_signal(stop)
            _, err = await asyncio.wait_for(process.communicate(), 60)
        finally:
            await blocking.rollback()
        assert process.returncode == 0, err.decode()
        assert "cleanup of the old shadow left to the next run" in err.decode()
        assert "cancelled" not in err.decode()
        assert (await live_versions(conn))["records"] == 2
    run_rebuild(stack)  # drops what was left
    async with read_conn(stack) as conn:
        assert await conn.fetchval("SELECT to_regnamespace('cqrs_rebuild')") is None
        assert (await live_versions(conn))["records"] == 3


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_two_stops_while_a_committed_swap_is_recorded_still_report_it(
    stack: Stack, stop: signal.Signals
) -> None:
    """The swap committed and its record waits on a lock: a stop, and a second one a moment
    later (an impatient Ctrl-C), neither cancel nor cut the record short: exit 0, done."""
    await seed(stack, 500, 50)
    args, env = rebuild_command(stack, REBUILD_SWAP_ATTEMPTS="10000")
    async with read_conn(stack) as writers, read_conn(stack) as holder, read_conn(stack) as conn:

        async def phase_is(phase: str) -> bool:
            run = await read_run(conn, "twice")
            return run is not None and run.phase == phase

        holding = holder.transaction()
        await holding.start()
        try:
            async with writers.transaction():
                # The swap waits behind the writers' lock until the run's record is held.
                await writers.execute("LOCK TABLE records IN ROW EXCLUSIVE MODE")
                process = await asyncio.create_subprocess_exec(
                    *args, "--run-id", "twice", env=env, stderr=asyncio.subprocess.PIPE
                )
                await wait_until(lambda: phase_is("swap"), 60, "the rebuild to reach its swap")
                await holder.execute("SELECT 1 FROM rebuild_runs WHERE run_id = 'twice' FOR UPDATE")

            async def recording() -> bool:
                return (await live_versions(conn))["records"] == 2 and bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE 'UPDATE rebuild_runs%'"
                    )
                )

            await wait_until(recording, 60, "the swap to commit and its record to wait")
            process.send_signal(stop)
            await asyncio.sleep(0.5)  # the second stop a moment later, not a wait for a state
            process.send_signal(stop)
            await asyncio.sleep(0.5)
        finally:
            await holding.rollback()
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        assert "cancelled" not in err.decode()
        assert await phase_is("done")
        assert (await live_versions(conn))["records"] == 2
    await stack.assert_converges()


@pytest.mark.parametrize("interruption", ["SIGTERM", "session terminated"])
async def test_a_swap_interrupted_while_it_commits_reports_the_swap_it_committed(
    write_pg: PostgresServer,
    redis_server: RedisServer,
    server_root: Path,
    fresh_names: str,
    tmp_path: Path,
    interruption: str,
) -> None:
    """SIGTERM to the run, or its read-DB session terminated (an administrator, a failover),
    while the swap's COMMIT is under way: the server commits it regardless (here it has, and
    waits for a synchronous standby that never answers, which the cancel or the termination
    ends), so the run reports and records the swap (exit 0, done), never "cancelled:
    unchanged" or "failed".

    The read DB is a server of this test's own: the standby setting holds every commit on it.
    """
    read_pg = PostgresServer(server_root / f"pg-commit-{fresh_names}", free_port(), durable=False)
    await asyncio.to_thread(read_pg.start)
    try:
        async with open_stack(write_pg, read_pg, redis_server, fresh_names, tmp_path) as stack:
            await seed(stack, 500, 50)
            args, env = rebuild_command(stack, REBUILD_LOCK_TIMEOUT="10")
            url = stack.env["READ_DB_URL"]
            local = {"synchronous_commit": "local"}  # this test's sessions never wait
            conn = await asyncpg.connect(url, server_settings=local)
            holder = await asyncpg.connect(url, server_settings=local)
            probe = await asyncpg.connect(url)
            try:
                before = await _records_oid(conn)
                await conn.execute("CREATE TABLE sync_probe (i int)")  # a commit that logs
                holding = holder.transaction()
                await holding.start()
                await holder.execute("SELECT 1 FROM records LIMIT 1")  # the moves wait on it
                process = await asyncio.create_subprocess_exec(
                    *args, "--run-id", "commit", env=env, stderr=asyncio.subprocess.PIPE
                )

                pid = await _moves_waiting(conn, process)
                await conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
                await conn.execute("SELECT pg_reload_conf()")

                def insert() -> asyncio.Future[str]:
                    return asyncio.ensure_future(probe.execute("INSERT INTO sync_probe VALUES (1)"))

                probing = insert()

                async def waits_for_standby(backend: int | None) -> bool:
                    event = await conn.fetchval(
                        "SELECT wait_event FROM pg_stat_activity WHERE pid = $1", backend
                    )
                    return bool(event == "SyncRep")

                async def probe_waits() -> bool:
                    nonlocal probing
                    if probing.done():  # committed before the server took the setting
                        probing.result()
                        probing = insert()
                        return False
                    return await waits_for_standby(probe.get_server_pid())

                # A commit of the probe waits for the standby: so will the swap's.
                await wait_until(probe_waits, 30, "commits to wait")
                await holding.rollback()
                await wait_until(lambda: waits_for_standby(pid), 30, "the swap's commit")
                if interruption == "SIGTERM":
                    process.send_signal(signal.SIGTERM)
                else:
                    await conn.execute("SELECT pg_terminate_backend($1)", pid)

                async def commit_returned() -> bool:
                    return not await waits_for_standby(pid)

                await wait_until(commit_returned, 30, "the swap's wait to end")
                await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
                await conn.execute("SELECT pg_reload_conf()")
                await asyncio.wait_for(probing, 30)
                _, err = await asyncio.wait_for(process.communicate(), 60)
                run = await read_run(conn, "commit")
                assert process.returncode == 0, err.decode()
                assert "which committed: the new version is live" in err.decode()
                assert "cancelled" not in err.decode()
                assert run is not None and run.phase == "done", run
                assert (await live_versions(conn))["records"] == 2
                assert await _records_oid(conn) != before
            finally:
                for session in (conn, holder, probe):
                    session.terminate()
            await stack.assert_converges()
    finally:
        await asyncio.to_thread(read_pg.stop)


async def test_a_command_the_read_db_refuses_fails_the_rebuild_without_its_value(
    stack: Stack,
) -> None:
    """A constraint of the read DB that one command breaks: exit 1, a message naming its
    position, the constraint and the SQLSTATE; neither stderr nor the run record holds the
    value (PostgreSQL's DETAIL has the failing row)."""
    await seed(stack, 50, 10)
    secret = "secret-4111111111111111"
    async with stack.write_engine.begin() as session:
        conn = await driver_of(session)
        position = await conn.fetchval(
            "INSERT INTO commands (key, value, event_type, published)"
            " VALUES ('card:1', $1, 'RecordCreated', true) RETURNING id",
            secret,
        )
    async with read_conn(stack) as conn:
        await conn.execute(
            "ALTER TABLE records ADD CONSTRAINT no_secret CHECK (value NOT LIKE 'secret-%')"
        )
    args, env = rebuild_command(stack)
    done = subprocess.run([*args, "--run-id", "refused"], env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "constraint no_secret" in done.stderr and "SQLSTATE 23514" in done.stderr
    assert str(position) in done.stderr and "cqrs-stack dlq" in done.stderr
    assert secret not in done.stdout + done.stderr and "DETAIL" not in done.stderr
    async with read_conn(stack) as conn:
        run = await read_run(conn, "refused")
        assert run is not None and run.phase == "failed" and run.error is not None
        assert "no_secret" in run.error and secret not in run.error and "DETAIL" not in run.error
        assert (await live_versions(conn))["records"] == 1


async def test_sigterm_during_the_start_is_a_cancel(stack: Stack) -> None:
    """SIGTERM while the process still imports and connects (before the rebuild's own
    handler) or once the run began: exit 130 as any cancel, the live version unchanged; a
    signal before the interpreter has loaded the CLI kills it having started nothing."""
    await seed(stack, 500, 50)
    # The run waits in its swap behind the writers' lock: it lasts past the last signal.
    args, env = rebuild_command(stack, REBUILD_SWAP_ATTEMPTS="10000")
    async with read_conn(stack) as writers, writers.transaction():
        await writers.execute("LOCK TABLE records IN ROW EXCLUSIVE MODE")
        async with read_conn(stack) as conn:
            runs = await conn.fetchval("SELECT count(*) FROM rebuild_runs")
        for delay in (0.3, 0.8, 1.3):  # imports, then the engines: the first seconds
            process = await asyncio.create_subprocess_exec(
                *args, env=env, stderr=asyncio.subprocess.PIPE
            )
            await asyncio.sleep(delay)  # a moment of the start, not a wait for a condition
            assert process.returncode is None, delay
            process.terminate()
            _, err = await asyncio.wait_for(process.communicate(), 60)
            if process.returncode == -signal.SIGTERM:
                # On a loaded machine the signal can land before the interpreter has even
                # imported the CLI: then it dies by the default action, having started
                # nothing (no output, no run recorded; the live version is checked below).
                assert not err.strip(), (delay, err.decode())
                async with read_conn(stack) as conn:
                    assert await conn.fetchval("SELECT count(*) FROM rebuild_runs") == runs
                continue
            assert process.returncode == 130, (delay, process.returncode, err.decode())
            assert "cancelled" in err.decode()
            async with read_conn(stack) as conn:
                runs = await conn.fetchval("SELECT count(*) FROM rebuild_runs")
    async with read_conn(stack) as conn:
        assert (await live_versions(conn))["records"] == 1


@asynccontextmanager
async def _stack_on_own_read_server(
    kind: str,
    names: str,
    write_pg: PostgresServer,
    redis_server: RedisServer,
    server_root: Path,
    tmp_path: Path,
) -> AsyncIterator[tuple[Stack, int]]:
    """A stack whose read DB is on a server of the test's own (the test may SIGSTOP it), with
    500 commands; yields it and the server's process group."""
    read_pg = PostgresServer(server_root / f"pg-{kind}-{names}", free_port(), durable=False)
    await asyncio.to_thread(read_pg.start)
    assert read_pg.process is not None
    try:
        async with open_stack(write_pg, read_pg, redis_server, names, tmp_path) as stack:
            await seed(stack, 500, 50)
            yield stack, os.getpgid(read_pg.process.pid)
    finally:
        await asyncio.to_thread(read_pg.stop)


async def test_a_stopped_rebuild_whose_read_db_hangs_exits_within_its_bound(
    write_pg: PostgresServer,
    redis_server: RedisServer,
    server_root: Path,
    fresh_names: str,
    tmp_path: Path,
) -> None:
    """SIGTERM while the read DB does not answer at all (its server SIGSTOPped during the
    swap's lock wait): the cancel cannot reach it, so the run exits 1 after _STOP_WITHIN
    seconds saying that the outcome is not known, within a Job's 30 s grace period, instead
    of hanging until the pod is killed."""
    async with _stack_on_own_read_server(
        "hung", fresh_names, write_pg, redis_server, server_root, tmp_path
    ) as (stack, group):
        args, env = rebuild_command(stack, REBUILD_LOCK_TIMEOUT="10")
        conn = await asyncpg.connect(stack.env["READ_DB_URL"])
        holding = conn.transaction()
        await holding.start()
        await conn.execute("SELECT 1 FROM records LIMIT 1")  # the moves wait on it
        process = await asyncio.create_subprocess_exec(
            *args, "--run-id", "hung", env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            await _moves_waiting(conn, process)
            os.killpg(group, signal.SIGSTOP)
            stopped = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), _STOP_WITHIN + 10)
            took = time.monotonic() - stopped
        finally:
            os.killpg(group, signal.SIGCONT)
            conn.terminate()
        assert process.returncode == 1, err.decode()
        assert f"did not answer within {_STOP_WITHIN} s" in err.decode()
        assert _STOP_WITHIN <= took <= _STOP_WITHIN + 5, took
        # Nothing committed: the next rebuild runs as usual.
        run_rebuild(stack)


async def test_a_grant_made_while_the_swap_waits_for_its_locks_is_the_new_versions(
    stack: Stack, fresh_names: str
) -> None:
    """A GRANT on a live table needs no lock the swap's EXCLUSIVE one holds off: made while the
    swap waits for the writers (a projector's batch in flight), it lands on the table being
    replaced, and the swap, which reads the privileges under its ACCESS EXCLUSIVE lock, gives
    it to the new version."""
    await seed(stack, 500, 50)
    role = f"late_{fresh_names}"
    # One attempt waits long enough for the GRANT to come while it waits.
    args, env = rebuild_command(stack, REBUILD_LOCK_TIMEOUT="10")
    async with read_conn(stack) as writers, read_conn(stack) as conn:
        await conn.execute(f"CREATE ROLE {role}")
        try:
            async with writers.transaction():
                await writers.execute("LOCK TABLE records IN ROW EXCLUSIVE MODE")
                process = await asyncio.create_subprocess_exec(
                    *args, "--run-id", "grant", env=env, stderr=asyncio.subprocess.PIPE
                )

                async def swap_waits() -> bool:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) FROM pg_locks WHERE mode = 'ExclusiveLock'"
                            " AND NOT granted AND relation = 'public.records'::regclass"
                        )
                    )

                await wait_until(swap_waits, 60, "the swap to wait for the writers")
                await conn.execute(f"GRANT SELECT ON records TO {role}")
            _, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0, err.decode()
            assert (await live_versions(conn))["records"] == 2
            assert await conn.fetchval(
                "SELECT has_table_privilege($1, 'public.records', 'SELECT')", role
            )
        finally:
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")


async def test_a_swap_whose_session_is_lost_before_its_commit_fails_clearly(
    stack: Stack,
) -> None:
    """The swap's read-DB session terminated while it waits for its moves' lock (before any
    COMMIT): nothing committed, the run fails (exit 1) naming the lost session and saying the
    live model is unchanged, and the next rebuild runs."""
    await seed(stack, 500, 50)
    args, env = rebuild_command(stack, REBUILD_LOCK_TIMEOUT="10")
    async with read_conn(stack) as holder, read_conn(stack) as conn:
        before = await _records_oid(conn)
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM records LIMIT 1")  # the moves wait on it
            process = await asyncio.create_subprocess_exec(
                *args, env=env, stderr=asyncio.subprocess.PIPE
            )

            pid = await _moves_waiting(conn, process, 60)
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
            _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 1, err.decode()
        assert "session was lost during the swap" in err.decode()
        assert "the live read model is unchanged" in err.decode()
        assert await _records_oid(conn) == before
        assert (await live_versions(conn))["records"] == 1
    run_rebuild(stack)


async def test_a_commit_the_read_db_refuses_fails_the_rebuild_at_once(stack: Stack) -> None:
    """A COMMIT the server answers with an error (a deferred constraint of an operator's own,
    here on read_model_versions) rolled back: the run fails with that error, at once, not
    after waiting to learn whether a lost session committed."""
    await seed(stack, 500, 50)
    async with read_conn(stack) as conn:
        await conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'versions are frozen'; END $$;"
            " CREATE CONSTRAINT TRIGGER frozen AFTER INSERT OR UPDATE ON read_model_versions"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
        before = await _records_oid(conn)
        args, env = rebuild_command(stack)
        done = await asyncio.to_thread(
            subprocess.run, args, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode != 0, done.stderr
        assert "versions are frozen" in done.stderr
        assert "whether it committed" not in done.stderr
        assert await _records_oid(conn) == before
        await conn.execute("DROP TRIGGER frozen ON read_model_versions; DROP FUNCTION refuse()")


@pytest.mark.parametrize("read_db", ["answering", "hung"])
async def test_a_stop_while_the_recorded_swaps_clean_up_waits_exits_0(
    write_pg: PostgresServer,
    redis_server: RedisServer,
    server_root: Path,
    fresh_names: str,
    tmp_path: Path,
    read_db: str,
) -> None:
    """The run recorded done and its DROP SCHEMA of the shadow waits on a lock (a table a
    session of the test's created in the shadow while the run loaded): SIGTERM exits 0
    saying the clean-up is left to the next run, at once while the read DB answers, within
    _STOP_WITHIN seconds (a Job's grace period) when its server is SIGSTOPped during that
    wait; the next rebuild drops what was left."""
    async with _stack_on_own_read_server(
        "cleanup", fresh_names, write_pg, redis_server, server_root, tmp_path
    ) as (stack, group):
        args, env = rebuild_command(stack, REBUILD_SWAP_ATTEMPTS="10000")
        url = stack.env["READ_DB_URL"]
        conn, writers, blocker = [await asyncpg.connect(url) for _ in range(3)]
        blocking = blocker.transaction()
        await blocking.start()

        async def recorded(phases: Sequence[str]) -> bool:
            run = await read_run(conn, "cleanup")
            return run is not None and run.phase in phases

        async def shadow_exists() -> bool:
            return await recorded(("load", "catch-up", "verify", "swap")) and bool(
                await conn.fetchval("SELECT to_regnamespace('cqrs_rebuild') IS NOT NULL")
            )

        async def dropping() -> bool:
            return await recorded(("done",)) and bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE 'DROP SCHEMA%'"
                )
            )

        hung = False
        try:
            async with writers.transaction():
                # Holds the swap off (it retries) until the shadow's blocker is there.
                await writers.execute("LOCK TABLE records IN ROW EXCLUSIVE MODE")
                process = await asyncio.create_subprocess_exec(
                    *args, "--run-id", "cleanup", env=env, stderr=asyncio.subprocess.PIPE
                )
                await wait_until(shadow_exists, 60, "the run to create its shadow")
                # Held until this transaction ends: the clean-up's DROP SCHEMA waits on it.
                await blocker.execute("CREATE TABLE cqrs_rebuild.blocker ()")
            await wait_until(dropping, 60, "the run's record to say done and its DROP to wait")
            if read_db == "hung":
                os.killpg(group, signal.SIGSTOP)
                hung = True
            stopped = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), _STOP_WITHIN + 10)
            took = time.monotonic() - stopped
        finally:
            if hung:
                os.killpg(group, signal.SIGCONT)
            await blocking.rollback()
            for each in (conn, writers, blocker):
                await each.close(timeout=10)
        assert process.returncode == 0, err.decode()
        assert "left to the next run" in err.decode(), err.decode()
        assert "cancelled" not in err.decode() and "not known" not in err.decode()
        assert took <= (_STOP_WITHIN + 5 if hung else 5), took
        run_rebuild(stack)  # drops what was left
        async with read_conn(stack) as check:
            assert await check.fetchval("SELECT to_regnamespace('cqrs_rebuild')") is None
            assert (await live_versions(check))["records"] == 3
            run = await read_run(check, "cleanup")
            assert run is not None and run.phase == "done", run


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not committed"])
async def test_a_run_lost_in_its_swaps_commit_is_settled_from_the_live_version(
    stack: Stack, committed: bool
) -> None:
    """A run whose every session was cut during its swap's COMMIT (a failover: it exits 1,
    it cannot tell) leaves its record at phase swap, its process gone (written here as it
    leaves it). ``cqrs-stack status`` shows it with whether its version is live; the next
    rebuild records it done when it is (its swap committed), failed with the live model
    unchanged when not, and says so."""
    await seed(stack, 200, 20)
    run_rebuild(stack)  # version 2 live, 1 kept
    lost_version = 2 if committed else 3
    async with read_conn(stack) as conn:
        await conn.execute(
            "INSERT INTO rebuild_runs (run_id, models, version, phase, done, total)"
            " VALUES ('lost', '{records}', $1, 'swap', 200, 200)",
            lost_version,
        )
    shown = cqrs_stack(stack, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    rebuilds = json.loads(shown.stdout)["rebuild"]
    assert rebuilds["live_versions"]["records"] == 2
    last = rebuilds["last_run"]
    assert (last["run_id"], last["phase"], last["version"]) == ("lost", "swap", lost_version)
    assert last["swap_committed"] is committed
    done = run_rebuild(stack, "--run-id", "next")
    settled = "done" if committed else "failed"
    assert f"run_id=lost was lost at phase swap: recorded {settled}" in done.stderr, done.stderr
    async with read_conn(stack) as conn:
        lost = await read_run(conn, "lost")
        assert lost is not None and lost.phase == settled and lost.finished_at is not None
        assert lost.error is not None
        assert ("committed: version 2 is live" if committed else "did not commit") in lost.error
        assert (await live_versions(conn))["records"] == 3
    again = json.loads(cqrs_stack(stack, "status", "--json").stdout)["rebuild"]
    assert again["last_run"]["run_id"] == "next" and again["last_run"]["phase"] == "done"
    assert "swap_committed" not in again["last_run"]


@pytest.mark.parametrize("side", ["read", "write"])
async def test_a_session_cut_during_the_loads_copy_fails_the_rebuild_clearly(
    stack: Stack, side: str
) -> None:
    """One end of the load's COPY pipe loses its backend (terminated, as a failover or an OOM
    kill would) while the pipe is full: the rebuild fails at once with the dependency's exit
    code and one line (it hung, waiting for a drain that never came; or told an "internal
    client error" of the other end's session, cut mid-COPY), and the live model is as it
    was."""
    await seed(stack, 200_000, 2_000, value_sql="repeat('v', 200)")
    run_rebuild(stack)  # the live model of the seed
    before = await stack.scalar(stack.read_engine, "SELECT sum(write_count) FROM records")
    args, env = rebuild_command(stack, REBUILD_BATCH_MAX_BYTES="1024")
    process = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    communicating = asyncio.create_task(process.communicate())
    url = stack.env["READ_DB_URL" if side == "read" else "WRITE_DB_URL"]
    conn = await asyncpg.connect(plain_database_url(url))
    try:
        # Polled faster than wait_until does: the copy lasts under a second here.
        for _ in range(6000):
            assert process.returncode is None, "the rebuild ended before its copy was seen"
            copier = await conn.fetchval(
                "SELECT pid FROM pg_stat_progress_copy WHERE command = $1"
                " AND tuples_processed > 1000",
                "COPY FROM" if side == "read" else "COPY TO",
            )
            if copier:
                break
            await asyncio.sleep(0.005)
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", copier)
    finally:
        await conn.close()
    _, err = await asyncio.wait_for(communicating, 30)
    assert process.returncode == 10, err.decode()[-2000:]  # EXIT_DEPENDENCY_LOST
    assert "a database or Redis failed: " in err.decode()
    assert "unexpected error" not in err.decode()
    after = await stack.scalar(stack.read_engine, "SELECT sum(write_count) FROM records")
    assert after == before == 200_000


@pytest.mark.parametrize("cut", ["write", "read"])
async def test_a_session_cut_while_the_load_waits_for_a_writer_fails_clearly(
    stack: Stack, cut: str
) -> None:
    """A writer open across the load's fence keeps the load waiting for it (up to 5 s); the
    rebuild's write-DB session, or its read-DB one, is terminated meanwhile: exit 10 with one
    line (the driver's "connection is closed" was an unexpected error, exit 70), and the next
    rebuild succeeds."""
    await seed(stack, 2_000, 200)
    held, _ = await held_write(stack, "held")
    url = stack.env["WRITE_DB_URL" if cut == "write" else "READ_DB_URL"]
    conn = await asyncpg.connect(plain_database_url(url))
    try:
        args, env = rebuild_command(stack)
        process = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        communicating = asyncio.create_task(process.communicate())
        session: list[int] = []

        async def waiting() -> bool:
            assert process.returncode is None, "the rebuild ended before its wait was seen"
            write_session = await stack.scalar(
                stack.write_engine,
                "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pid IS NULL%'"
                " AND application_name LIKE 'cqrs-%' AND pid <> pg_backend_pid()",
            )
            if write_session is None:
                return False
            if cut == "read":  # its work session: the one holding the rebuild's lock
                write_session = await conn.fetchval(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND pid <> pg_backend_pid() LIMIT 1"
                )
            session[:] = [write_session]
            return True

        await wait_until(waiting, 30, "the load to wait for the open writer")
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", session[0])
        _, err = await asyncio.wait_for(communicating, 30)
    finally:
        await held.execute("ROLLBACK")
        await held.close()
        await conn.close()
    assert process.returncode == 10, err.decode()[-2000:]
    assert "a database or Redis failed: " in err.decode()
    run_rebuild(stack)


async def test_a_stop_while_a_frozen_backend_holds_the_load_is_a_cancel(stack: Stack) -> None:
    """SIGTERM while the read DB's backend of the load's COPY is SIGSTOPped: the cancel
    cannot reach it, so at the 20 s bound the run exits 130 saying the live model is unchanged
    (no swap had begun), not 1 "whether its swap committed is not known"."""
    await seed(stack, 100_000, 1_000, value_sql="repeat('v', 200)")
    args, env = rebuild_command(stack, REBUILD_BATCH_MAX_BYTES="1024")
    process = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    communicating = asyncio.create_task(process.communicate())
    conn = await asyncpg.connect(plain_database_url(stack.env["READ_DB_URL"]))
    frozen = None
    try:
        # Polled faster than wait_until does: the copy lasts under a second here.
        for _ in range(6000):
            assert process.returncode is None, "the rebuild ended before its copy was seen"
            frozen = await conn.fetchval(
                "SELECT pid FROM pg_stat_progress_copy WHERE command = 'COPY FROM'"
                " AND tuples_processed > 1000"
            )
            if frozen:
                break
            await asyncio.sleep(0.005)
        assert frozen
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(communicating, _STOP_WITHIN + 10)
        took = time.monotonic() - stopped
    finally:
        if frozen:
            os.kill(frozen, signal.SIGCONT)
        await conn.close()
    assert process.returncode == 130, err.decode()[-2000:]
    assert "the live read model is unchanged" in err.decode()
    assert _STOP_WITHIN <= took <= _STOP_WITHIN + 5, took
    run_rebuild(stack)
