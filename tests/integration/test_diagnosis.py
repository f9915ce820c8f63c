"""Why the projection is behind, against real servers: a write-DB transaction pinning the
catch-up watermark, a consumer that stopped, Redis down, the read DB refusing, the gauges."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

import asyncpg
import httpx
import psutil
import pytest
from redis.asyncio import Redis
from sqlalchemy import text

from cqrs_stack import diagnosis
from cqrs_stack.cli import EXIT_READ_DB
from cqrs_stack.config import Settings, plain_database_url
from cqrs_stack.db import create_engine
from cqrs_stack.localservers import PostgresServer, RedisServer
from cqrs_stack.stream import ensure_group
from tests.fixtures.stack import Stack, wait_until
from tests.integration.test_guarantees import write_many

GAUGES = (
    "cqrs_projection_lag_events",
    "cqrs_projection_lag_seconds",
    "cqrs_projection_oldest_pending_seconds",
    "cqrs_dead_letters",
    "cqrs_oldest_dead_letter_seconds",
    "cqrs_catchup_watermark_age_seconds",
)


def _settings(stack: Stack, **overrides: object) -> Settings:
    return stack.settings.model_copy(update=overrides)


async def _diagnose(stack: Stack, settings: Settings) -> diagnosis.Diagnosis:
    return await diagnosis.diagnose(stack.write_engine, stack.read_engine, stack.redis, settings)


def _gauges(text: str) -> dict[str, float]:
    found = {}
    for name in GAUGES:
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        if match:
            found[name] = float(match.group(1))
    return found


async def test_a_transaction_pinning_the_watermark_is_named_until_it_commits(
    stack: Stack,
) -> None:
    """An idle-in-transaction write-DB session with an xid, open while commands commit after
    it: the sweep passes it, and the explanation names its xid, pid, application and state,
    the verdict is degraded once it is older than PROJECTION_LAG_TARGET; after its commit the
    pin clears. The projector's gauges show the watermark's age meanwhile."""
    target = {"PROJECTION_LAG_TARGET": "1", "PROJECTOR_HEALTH_INTERVAL": "0.2"}
    stack.env.update(target)
    settings = _settings(stack, projection_lag_target=1.0)
    api = await stack.launch("api")
    projector = await stack.launch("projector")
    holder = await asyncpg.connect(
        plain_database_url(settings.write_db_url), server_settings={"application_name": "psql"}
    )
    try:
        await holder.execute("BEGIN")
        xid = int(await holder.fetchval("SELECT pg_current_xact_id()::text"))
        pid = await holder.fetchval("SELECT pg_backend_pid()")
        await write_many(api.url, 20, keys=5)
        await stack.assert_converges()  # the pin holds back nothing but its own commands

        seen: list[dict[str, object]] = []

        async def named() -> bool:
            found = await _diagnose(stack, settings)
            seen[:] = [found.as_dict()]
            return found.judgement.verdict == "degraded" and any(
                p.xid == xid for p in found.catch_up.pinned_by
            )

        try:
            await wait_until(named, 20, f"the pinning transaction {xid} named")
        except pytest.fail.Exception:
            pytest.fail(f"transaction {xid} not named as pinning; last reading: {seen}")
        found = await _diagnose(stack, settings)
        pin = found.catch_up.pinned_by[0]
        assert (pin.xid, pin.pid, pin.application_name) == (xid, pid, "psql")
        assert pin.state == "idle in transaction"
        assert pin.open_seconds is not None and pin.open_seconds >= 1.0
        assert found.catch_up.watermark is not None and found.catch_up.watermark <= xid
        assert found.judgement.reason.startswith(
            f"catch-up watermark pinned by write-DB transaction {xid} (pid {pid}, app 'psql',"
            " idle in transaction for "
        )
        async with httpx.AsyncClient(timeout=10) as client:
            stats = (await client.get(f"{api.url}/stats")).json()
            assert stats["health"]["verdict"] == "degraded"
            assert stats["health"]["catch_up"]["pinned_by"][0]["pid"] == pid
            assert stats["lag_events"] == 0  # the existing fields stay

            async def gauged() -> bool:
                body = (await client.get(f"{projector.url}/metrics")).text
                gauges = _gauges(body)
                return (
                    len(gauges) == len(GAUGES)
                    and gauges["cqrs_catchup_watermark_age_seconds"] >= 1.0
                    and gauges["cqrs_dead_letters"] == 1
                )

            await stack.redis.xadd(settings.dead_letter_stream, {"dead_letter_reason": "x"})
            await wait_until(gauged, 10, "the projector's gauges")
            gauges = _gauges((await client.get(f"{projector.url}/metrics")).text)
            assert gauges["cqrs_projection_lag_events"] == 0
            assert 0 <= gauges["cqrs_oldest_dead_letter_seconds"] < 60
            assert gauges["cqrs_projection_lag_seconds"] == 0
            # Only projectors export them: an API's 0 would hide a stopped projector's lag.
            assert not _gauges((await client.get(f"{api.url}/metrics")).text)
        await holder.execute("COMMIT")

        async def cleared() -> bool:
            found = await _diagnose(stack, settings)
            return not found.catch_up.pinned_by and found.judgement.verdict == "ok"

        await wait_until(cleared, 20, "the pin to clear after the commit")
    finally:
        await holder.close()


async def test_a_consumer_that_read_and_never_acks_is_named_with_its_entries(
    stack: Stack,
) -> None:
    """No projector; a consumer took three entries and never acknowledged them: past
    PROJECTOR_STOPPED_AFTER it is named as stopped, with its oldest pending entry, and with
    nobody else reading the verdict is stalled."""
    settings = _settings(stack, projector_stopped_after=1.0)
    name, group = settings.event_stream_name, settings.consumer_group
    await ensure_group(stack.redis, name, group)
    ids = [(await stack.redis.xadd(name, {"type": "put", "n": str(i)})).decode() for i in range(5)]
    await stack.redis.xreadgroup(group, "ghost", {name: ">"}, count=3)

    fresh = await _diagnose(stack, settings)
    assert fresh.judgement.verdict != "stalled"  # within the bound: still a reader
    ghost = fresh.stream.consumers[0]
    assert (ghost.name, ghost.pending, ghost.stopped) == ("ghost", 3, False)
    assert fresh.stream.lag_events == 5 and fresh.stream.undelivered == 2

    async def stalled() -> bool:
        return (await _diagnose(stack, settings)).judgement.verdict == "stalled"

    await wait_until(stalled, 10, "the consumer to count as stopped")
    found = await _diagnose(stack, settings)
    ghost = found.stream.consumers[0]
    assert ghost.stopped and ghost.idle_seconds > 1.0
    assert ghost.oldest_pending is not None
    assert (ghost.oldest_pending.entry_id, ghost.oldest_pending.deliveries) == (ids[0], 1)
    assert found.stream.oldest_pending == ghost.oldest_pending
    assert found.stream.lag_seconds >= ghost.oldest_pending.age_seconds
    assert "no consumer reads the stream" in found.judgement.reason
    assert (
        "'ghost' idle" in found.judgement.reason and "holding 3 pending" in found.judgement.reason
    )
    assert ids[0] in found.judgement.reason
    assert found.as_dict()["stream"]["stopped_consumers"] == ["ghost"]


async def test_a_stopped_projector_is_named_and_clears_when_it_resumes(stack: Stack) -> None:
    """SIGSTOP the only projector: writes wait undelivered, and one bound past its last read
    the verdict is stalled naming that nobody reads; SIGCONT and it catches up to ok."""
    stack.env["PROJECTOR_STOPPED_AFTER"] = "1"
    settings = _settings(stack, projector_stopped_after=1.0)
    api = await stack.launch("api")
    projector = await stack.launch("projector")
    await write_many(api.url, 5, prefix="before")
    await stack.assert_converges()
    projector.process.send_signal(signal.SIGSTOP)
    try:
        await write_many(api.url, 7, prefix="during")

        async def stalled() -> bool:
            return (await _diagnose(stack, settings)).judgement.cause == "NoConsumerReading"

        await wait_until(stalled, 15, "the stopped projector to count as not reading")
        found = await _diagnose(stack, settings)
        assert found.judgement.verdict == "stalled"
        assert found.stream.lag_events == 7
        assert found.judgement.reason.startswith(
            "no consumer reads the stream: 7 entries not acknowledged"
        )
        (consumer,) = found.stream.consumers
        assert consumer.idle_seconds > 1.0
        if consumer.pending:  # Redis answered its blocked read before the stop took hold
            assert consumer.stopped
            assert f"{consumer.name!r} idle" in found.judgement.reason
            assert found.stream.oldest_pending is not None
            assert found.stream.oldest_pending.consumer == consumer.name
    finally:
        projector.process.send_signal(signal.SIGCONT)

    async def recovered() -> bool:
        return (await _diagnose(stack, settings)).judgement.verdict == "ok"

    await wait_until(recovered, 15, "the verdict back to ok")


async def test_redis_down_is_named_in_the_diagnosis_and_status(
    stack: Stack, redis_factory: Callable[[], RedisServer]
) -> None:
    server = redis_factory()
    stack.use_redis(server)
    settings = stack.settings
    server.kill()
    found = await _diagnose(stack, settings)
    assert not found.stream.reachable and found.dead_letters is None
    assert found.judgement.verdict == "degraded"
    assert found.judgement.reason.startswith("Redis unreachable (")
    done = subprocess.run(
        [sys.executable, "-m", "cqrs_stack.cli", "status", "--json"],
        env={**stack.env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    health = json.loads(done.stdout)["health"]
    assert health["redis_reachable"] is False
    assert health["reason"].startswith("Redis unreachable")


async def test_a_read_db_refusing_is_named_without_its_credentials(stack: Stack) -> None:
    """A read DB that refuses the login: the verdict is stalled and names the error class
    and SQLSTATE, never the password."""
    wrong = "not-the-password-42"
    url = re.sub(r"://([^:]+):[^@]*@", rf"://\1:{wrong}@", stack.settings.read_db_url)
    settings = _settings(stack, read_db_url=url)
    engine = create_engine(url, settings, application_name="test")
    try:
        found = await diagnosis.diagnose(stack.write_engine, engine, stack.redis, settings)
    finally:
        await engine.dispose()
    assert found.judgement.verdict == "stalled"
    assert found.judgement.reason == "read DB refusing: InvalidPasswordError (SQLSTATE 28P01)"
    assert not found.catch_up.available
    assert wrong not in json.dumps(found.as_dict())


async def test_stats_names_a_read_db_that_stops_accepting_connections(
    stack: Stack, read_pg: PostgresServer
) -> None:
    """A running read API whose read DB stops accepting connections: /stats answers 503 and
    its detail.health names the refusal; once allowed again /stats answers 200 with health."""
    api = await stack.launch("read-api")
    database = stack.settings.read_db_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(plain_database_url(read_pg.url()))
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database
        )
        async with httpx.AsyncClient(timeout=20) as client:
            answer = await client.get(f"{api.url}/stats")
            assert answer.status_code == 503, answer.text
            health = answer.json()["detail"]["health"]
            assert health["verdict"] == "stalled"
            assert health["read_db_error"].endswith("(SQLSTATE 55000)")
            assert health["reason"] == f"read DB refusing: {health['read_db_error']}"
            assert read_pg.password not in answer.text
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

            async def served() -> bool:
                return (await client.get(f"{api.url}/stats")).status_code == 200

            await wait_until(served, 20, "/stats to answer again")
            assert (await client.get(f"{api.url}/stats")).json()["health"]["read_db_error"] is None
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()


async def test_dead_letters_are_counted_with_the_oldest_age(stack: Stack) -> None:
    settings = stack.settings
    redis: Redis = stack.redis
    await redis.xadd(settings.dead_letter_stream, {"dead_letter_reason": "poison"})
    await redis.xadd(settings.dead_letter_stream, {"dead_letter_reason": "poison"})
    found = await _diagnose(stack, settings)
    assert found.dead_letters is not None and found.dead_letters.count == 2
    assert found.dead_letters.oldest_seconds is not None
    assert 0 <= found.dead_letters.oldest_seconds < 60


async def _swept_past(stack: Stack, xid: int) -> bool:
    """The sweep keeps ``xid`` in its pending list: it passed it while it was open."""
    async with stack.read_engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT count(*) FROM projector_catchup_pending WHERE txid::text = :xid"),
            {"xid": str(xid)},
        )
    return bool(found)


async def test_a_transaction_of_another_database_pins_nothing(
    stack: Stack, write_pg: PostgresServer
) -> None:
    """A long transaction with an xid in another database of the write server (a pg_dump of
    another database, a session of another application) can never write ``commands``: the
    sweep may keep its xid pending, but the diagnosis names no pin, the verdict stays ok and
    the watermark's age (and its gauge) stays the time since the last sweep, well under the
    transaction's age."""
    stack.env.update(
        {
            "PROJECTION_LAG_TARGET": "1",
            "PROJECTOR_HEALTH_INTERVAL": "0.2",
            "PROJECTOR_CATCHUP_INTERVAL": "0.2",
        }
    )
    settings = _settings(stack, projection_lag_target=1.0, projector_catchup_interval=0.2)
    api = await stack.launch("api")
    projector = await stack.launch("projector")
    elsewhere = await asyncpg.connect(
        plain_database_url(write_pg.url("postgres")),
        server_settings={"application_name": "other-db"},
    )
    try:
        await elsewhere.execute("BEGIN")
        xid = int(await elsewhere.fetchval("SELECT pg_current_xact_id()::text"))
        began = time.monotonic()
        await write_many(api.url, 20, keys=5)
        await stack.assert_converges()
        await wait_until(lambda: _swept_past(stack, xid), 20, f"the sweep to pass {xid}")

        async def old_enough() -> bool:  # the transaction is now well past the lag target
            return time.monotonic() - began > 3.0

        await wait_until(old_enough, 10, "the other database's transaction to age")
        found = await _diagnose(stack, settings)
        assert found.catch_up.pinned_by == () and found.catch_up.unplaced == ()
        assert found.judgement.verdict == "ok", found.judgement
        assert found.catch_up.age_seconds is not None and found.catch_up.age_seconds < 2.0
        async with httpx.AsyncClient(timeout=10) as client:
            stats = (await client.get(f"{api.url}/stats")).json()
            assert stats["health"]["verdict"] == "ok", stats["health"]
            assert stats["health"]["catch_up"]["pinned_by"] == []
            body = (await client.get(f"{projector.url}/metrics")).text
            assert _gauges(body)["cqrs_catchup_watermark_age_seconds"] < 2.0
    finally:
        await elsewhere.close()


async def test_another_roles_sessions_are_placed_by_their_database(
    stack: Stack, write_pg: PostgresServer
) -> None:
    """Seen by a role without pg_read_all_stats, another role's sessions show their database
    and pid but not their state: one in the stack's write database is still named as a pin,
    one in another database of the server is not."""
    stack.env.update({"PROJECTOR_CATCHUP_INTERVAL": "0.2"})
    settings = _settings(stack, projector_catchup_interval=0.2)
    api = await stack.launch("api")
    await stack.launch("projector")
    role = f"watcher_{stack.settings.read_db_url.rsplit('/', 1)[1]}"
    ours = await asyncpg.connect(plain_database_url(settings.write_db_url))
    elsewhere = await asyncpg.connect(plain_database_url(write_pg.url("postgres")))
    await ours.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'watcher-pw'")
    url = re.sub(r"://[^@]*@", f"://{role}:watcher-pw@", settings.write_db_url)
    watcher = create_engine(url, settings, application_name="test")
    try:
        await ours.execute("BEGIN")
        await elsewhere.execute("BEGIN")
        mine = int(await ours.fetchval("SELECT pg_current_xact_id()::text"))
        other = int(await elsewhere.fetchval("SELECT pg_current_xact_id()::text"))
        pid = await ours.fetchval("SELECT pg_backend_pid()")
        await write_many(api.url, 10, keys=5)
        await stack.assert_converges()
        for xid in (mine, other):
            await wait_until(partial(_swept_past, stack, xid), 20, f"the sweep to pass {xid}")
        found = await diagnosis.diagnose(watcher, stack.read_engine, stack.redis, settings)
        assert [(p.xid, p.pid, p.state) for p in found.catch_up.pinned_by] == [(mine, pid, None)]
        assert found.catch_up.unplaced == ()
    finally:
        await watcher.dispose()
        await ours.execute("ROLLBACK")
        await elsewhere.close()
        await ours.execute(f"DROP ROLE {role}")
        await ours.close()


def _signal_server(server: PostgresServer, signum: signal.Signals) -> None:
    """Send ``signum`` to this test session's PostgreSQL server: its postmaster and backends."""
    assert server.process is not None
    postmaster = psutil.Process(server.process.pid)
    for process in [postmaster, *postmaster.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


async def test_a_hung_read_db_is_named_within_the_reading_timeout(
    stack: Stack, read_pg: PostgresServer
) -> None:
    """Every process of the read DB's server stopped (it accepts TCP, never answers; no
    statement timeout fires): /stats answers 503 within READING_TIMEOUT and a little, naming
    the read DB as not answering, and ``cqrs-stack status`` ends as soon with the same words;
    once the server runs again /stats answers 200."""
    api = await stack.launch("api")
    bound = diagnosis.READING_TIMEOUT + 3.0
    async with httpx.AsyncClient(timeout=60) as client:
        assert (await client.get(f"{api.url}/stats")).status_code == 200  # pools connected
        _signal_server(read_pg, signal.SIGSTOP)
        try:
            began = time.monotonic()
            answer = await client.get(f"{api.url}/stats")
            took = time.monotonic() - began
            assert answer.status_code == 503, answer.text
            assert took < bound, f"/stats took {took:.1f} s"
            health = answer.json()["detail"]["health"]
            assert health["reason"] == f"read DB: {diagnosis.NO_ANSWER}"
            assert health["cause"] == "ReadDbNotAnswering"
            assert health["catch_up"]["error"] == f"read DB: {diagnosis.NO_ANSWER}"
            began = time.monotonic()
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "cqrs_stack.cli", "status"],
                env={**stack.env, "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            took = time.monotonic() - began
            assert took < bound + 5.0, f"status took {took:.1f} s"  # + the interpreter's start
            assert done.returncode == EXIT_READ_DB, done.stderr
            assert "read DB at" in done.stderr and diagnosis.NO_ANSWER in done.stderr
        finally:
            _signal_server(read_pg, signal.SIGCONT)

        async def served() -> bool:
            return (await client.get(f"{api.url}/stats")).status_code == 200

        await wait_until(served, 30, "/stats to answer again")
