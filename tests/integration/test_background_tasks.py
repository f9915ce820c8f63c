"""No background task dies in silence (supervision.py), against live processes.

Each test makes a dependency fail in a way the task's code does not foresee (a row missing,
a trigger that refuses or swallows rows, an entry that is not UTF-8) and checks that the task
reports the failure on /ready, logs it, retries with back-off and recovers once the fault is
gone, while the process keeps running. The watchdog (a loop that ends while the process is
not stopping) is checked in-process, where a loop can be made to end.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from cqrs_stack.supervision import Backoff, Supervisor
from tests.fixtures.stack import ServiceProcess, Stack, wait_until


async def ready(service: ServiceProcess) -> tuple[int, dict[str, str]]:
    """/ready's status and checks."""
    async with httpx.AsyncClient(timeout=5) as client:
        answer = await client.get(f"{service.url}/ready")
    return answer.status_code, answer.json()["checks"]


async def wait_failing(service: ServiceProcess, task: str, *, unready: bool = True) -> str:
    """Wait until /ready reports ``task`` failing (answering 503 if ``unready``); its check."""
    found: dict[str, Any] = {}

    async def failing() -> bool:
        status, checks = await ready(service)
        found.update(checks)
        return status == (503 if unready else 200) and checks.get(task, "").startswith("error: ")

    await wait_until(failing, 15, f"/ready to report {task} failing")
    return str(found[task])


async def wait_recovered(service: ServiceProcess, task: str) -> None:
    """Wait until /ready is 200 with ``task`` ok, the process still the same one."""

    async def recovered() -> bool:
        status, checks = await ready(service)
        return status == 200 and checks.get(task) == "ok"

    await wait_until(recovered, 15, f"{task} to recover")
    assert service.process.poll() is None
    assert f"background task recovered task={task}" in service.log()


async def wait_backed_off(service: ServiceProcess, task: str) -> None:
    """Wait until the log shows retries of ``task`` with a growing delay."""

    async def backed_off() -> bool:
        pattern = rf"retrying in ([0-9.]+)s task={re.escape(task)} "
        delays = [float(d) for d in re.findall(pattern, service.log())]
        return len(delays) >= 3 and delays[0] < delays[1] < delays[2]

    await wait_until(backed_off, 15, f"{task} to be retried with back-off")


async def execute(engine: Any, *statements: str) -> None:
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_the_sweep_survives_a_failure_it_does_not_foresee(stack: Stack) -> None:
    projector = await stack.launch("projector")
    # The sweep's state gone: its table is not where the sweep expects it.
    await execute(stack.read_engine, "ALTER TABLE projector_catchup RENAME TO catchup_away")
    check = await wait_failing(projector, "catch-up-sweep")
    assert "failed rounds in a row" in check
    # Commands that only the sweep can deliver: in the write DB, never on the stream.
    await execute(
        stack.write_engine,
        "INSERT INTO commands (key, value, event_type)"
        " SELECT 'swept-' || i, 'v', 'RecordCreated' FROM generate_series(1, 20) AS i",
    )
    await wait_backed_off(projector, "catch-up-sweep")
    await execute(stack.read_engine, "ALTER TABLE catchup_away RENAME TO projector_catchup")
    await stack.assert_converges(20)
    await wait_recovered(projector, "catch-up-sweep")


async def test_the_consumer_survives_an_entry_that_is_not_utf8(stack: Stack) -> None:
    settings = stack.settings
    projector = await stack.launch("projector", PROJECTOR_MAX_DELIVERIES="2")
    writer = await stack.launch("write-api")
    await stack.redis.xadd(
        settings.event_stream_name,
        {b"type": b"\xff\xfe", b"position": b"1", b"key": b"k", b"value": b"v"},
    )

    async def dead_lettered() -> bool:
        return int(await stack.redis.xlen(settings.dead_letter_stream)) == 1

    await wait_until(dead_lettered, 15, "the entry to be dead-lettered")
    async with httpx.AsyncClient(timeout=5) as client:
        answer = await client.post(f"{writer.url}/write", json={"key": "after", "value": "v"})
        assert answer.status_code == 200

    async def projected_from_the_stream() -> bool:
        async with httpx.AsyncClient(timeout=5) as client:
            metrics = (await client.get(f"{projector.url}/metrics")).text
        found = re.search(r'cqrs_events_projected_total\{source="stream"\} ([0-9.]+)', metrics)
        return found is not None and float(found.group(1)) >= 1

    await wait_until(projected_from_the_stream, 15, "the consumer to project the next write")
    await stack.assert_converges(15)
    assert (await ready(projector))[0] == 200


async def test_the_consumer_reports_redis_refusing_every_call(stack: Stack) -> None:
    projector = await stack.launch("projector")
    name = stack.settings.event_stream_name
    await stack.redis.set(name, "notastream")  # every stream command: WRONGTYPE
    try:
        check = await wait_failing(projector, "stream-consumer")
        assert "WRONGTYPE" in check
        # Still backing off (its own delays), not spinning.
        pattern = r"redis refused a command, retrying in ([0-9.]+)s"

        async def backed_off() -> bool:
            delays = [float(d) for d in re.findall(pattern, projector.log())]
            return len(delays) >= 3 and delays[0] < delays[1] < delays[2]

        await wait_until(backed_off, 15, "the consumer to back off")
    finally:
        await stack.redis.delete(name)
    await wait_recovered(projector, "stream-consumer")


async def test_the_publisher_reports_failures_and_recovers(stack: Stack) -> None:
    writer = await stack.launch("write-api")
    await execute(
        stack.write_engine,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$",
        "CREATE TRIGGER refuse_updates BEFORE UPDATE ON commands"
        " FOR EACH ROW EXECUTE FUNCTION refuse()",
        # A queued event: committed, never published, older than the publisher's grace.
        "INSERT INTO commands (key, value, event_type, created_at)"
        " VALUES ('queued', 'v', 'RecordCreated', now() - interval '1 minute')",
    )
    # Reported, but writes are still served: the process stays ready.
    check = await wait_failing(writer, "publisher", unready=False)
    assert "refused by a trigger" in check
    await wait_backed_off(writer, "publisher")
    await execute(stack.write_engine, "DROP TRIGGER refuse_updates ON commands")

    async def published() -> bool:
        return bool(
            await stack.scalar(stack.write_engine, "SELECT bool_and(published) FROM commands")
        )

    await wait_until(published, 15, "the queued event to be published")
    # Each failed round had sent it before its mark failed: duplicates, harmless by design.
    assert int(await stack.redis.xlen(stack.settings.event_stream_name)) >= 1
    await wait_recovered(writer, "publisher")


async def test_the_read_counter_reports_failures_and_keeps_the_counts(stack: Stack) -> None:
    await execute(
        stack.read_engine,
        "INSERT INTO records (key, value, created_at, updated_at, first_command_id,"
        " last_command_id) VALUES ('k', 'v', now(), now(), 1, 1)",
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$",
        "CREATE TRIGGER refuse_updates BEFORE UPDATE ON records"
        " FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    reader = await stack.launch("read-api")
    async with httpx.AsyncClient(timeout=5) as client:
        counts = [(await client.get(f"{reader.url}/read/k")).json()["read_count"] for _ in range(3)]
    assert counts == [1, 2, 3]
    # Reported, but reads are still served: the process stays ready.
    check = await wait_failing(reader, "read-counter", unready=False)
    assert "refused by a trigger" in check
    await wait_backed_off(reader, "read-counter")
    await execute(stack.read_engine, "DROP TRIGGER refuse_updates ON records")

    async def stored() -> bool:
        return await stack.scalar(stack.read_engine, "SELECT read_count FROM records") == 3

    await wait_until(stored, 15, "the kept counts to be flushed")
    await wait_recovered(reader, "read-counter")


async def test_the_command_writer_survives_a_batch_it_cannot_answer(stack: Stack) -> None:
    writer = await stack.launch("write-api")
    # A trigger that silently drops a row: the INSERT returns fewer rows than it was given.
    await execute(
        stack.write_engine,
        "CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RETURN NULL; END $$",
        "CREATE TRIGGER swallow BEFORE INSERT ON commands FOR EACH ROW"
        " WHEN (NEW.key = 'vanishes') EXECUTE FUNCTION swallow()",
    )
    async with httpx.AsyncClient(timeout=10) as client:
        # Alone, a dropped row looks like a key another transaction holds: retried, then
        # answered 503 key_busy, nothing stored.
        answer = await client.post(f"{writer.url}/write", json={"key": "vanishes", "value": "v"})
        assert answer.status_code == 503 and answer.json()["error"] == "key_busy", answer.text
        after = await client.post(f"{writer.url}/write", json={"key": "next", "value": "v"})
        assert after.status_code == 200, after.text


# --- the mechanism itself, in-process -------------------------------------------------


def test_backoff_doubles_up_to_its_maximum_and_resets() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.next_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next_delay() == 0.1


async def test_a_loop_that_ends_while_not_stopping_is_fatal() -> None:
    fatal: list[str] = []
    supervisor = Supervisor(on_fatal=fatal.append)
    stopping = asyncio.Event()

    async def ends_itself() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # as a library that swallowed our stop and cancelled us would
        await asyncio.sleep(1)

    supervisor.run("doomed", ends_itself, until=stopping, interval=0.01)
    await asyncio.wait(list(supervisor.tasks.values()), timeout=5)
    await asyncio.sleep(0)
    assert fatal == ["background task doomed ended unexpectedly: cancelled"]
    assert supervisor.checks() == {"doomed": "error: stopped"}


async def test_a_stop_finishes_the_round_in_progress_and_is_not_fatal() -> None:
    fatal: list[str] = []
    supervisor = Supervisor(on_fatal=fatal.append)
    stopping = asyncio.Event()
    finished: list[bool] = []

    async def slow_round() -> None:
        await asyncio.sleep(0.3)
        finished.append(True)

    supervisor.run("slow", slow_round, until=stopping, interval=0.01)
    await asyncio.sleep(0.1)
    stopping.set()
    await supervisor.stop(None, within=5)
    assert finished == [True]
    assert fatal == []


async def test_a_stop_cancels_a_round_past_its_bound() -> None:
    within = 0.1
    supervisor = Supervisor(on_fatal=pytest.fail)
    stopping = asyncio.Event()

    async def stuck() -> None:
        await asyncio.sleep(60)

    supervisor.run("stuck", stuck, until=stopping, interval=0.01)
    await asyncio.sleep(0.05)
    stopping.set()
    started = asyncio.get_running_loop().time()
    await supervisor.stop(None, within=within)
    assert asyncio.get_running_loop().time() - started < within + 1
    assert supervisor.tasks["stuck"].cancelled()
