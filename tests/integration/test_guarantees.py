"""One test per guarantee (DESIGN §4), with the fault made real on real servers.

Every test ends by checking that the read model equals the pure function of the write DB.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import httpx
from sqlalchemy import text

from cqrs_stack import events
from cqrs_stack.localservers import RedisServer
from tests.fixtures.stack import Stack, wait_until


async def write_many(url: str, count: int, prefix: str = "k", keys: int = 50) -> list[dict]:
    """Send ``count`` writes over ``keys`` keys, 16 at a time; every answer must be 2xx."""
    answers: list[dict] = []
    semaphore = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one(i: int) -> None:
            async with semaphore:
                method = "POST" if i < keys else "PUT"
                body = {"key": f"{prefix}{i % keys}", "value": f"v{i}"}
                answer = await client.request(method, "/write", json=body)
                assert answer.status_code == 200, answer.text
                answers.append(answer.json())

        await asyncio.gather(*(one(i) for i in range(count)))
    return answers


async def applied(stack: Stack) -> int:
    """How many commands the read model holds."""
    return int(await stack.scalar(stack.read_engine, "SELECT count(*) FROM applied_commands"))


async def test_kill_9_projector_mid_batch_then_restart(stack: Stack) -> None:
    api = await stack.launch("api")
    await write_many(api.url, 2000)
    async with stack.read_engine.connect() as blocker:
        # Hold the projector inside its batch transaction: ledger rows inserted, records not.
        await blocker.execute(text("LOCK TABLE records IN EXCLUSIVE MODE"))
        projector = await stack.launch(
            "projector", PROJECTOR_BATCH_SIZE="50", PROJECTOR_CATCHUP_INTERVAL="3600"
        )

        async def stuck_mid_batch() -> bool:
            waiting = await stack.scalar(
                stack.read_engine,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cqrs-projector'"
                " AND wait_event_type = 'Lock' AND query LIKE '%applied_commands%'",
            )
            return bool(waiting)

        await wait_until(stuck_mid_batch, 20, "the projector to block inside a batch")
        projector.kill()
        await blocker.rollback()
    assert await applied(stack) == 0, "the killed batch must leave no trace"
    pending = await stack.redis.xpending(stack.settings.event_stream_name, "projectors")
    assert pending["pending"] > 0, "the killed consumer's entries stay pending"
    await stack.launch("projector", PROJECTOR_BATCH_SIZE="50")
    await stack.assert_converges()


async def test_redis_down_while_writes_go_on(
    stack: Stack, redis_factory: Callable[[], RedisServer]
) -> None:
    redis = redis_factory()
    stack.use_redis(redis)
    api = await stack.launch("api")
    await stack.launch("projector")
    await write_many(api.url, 50, prefix="before")
    redis.kill()
    during = await write_many(api.url, 100, prefix="during")
    assert all(a["queued"] and a["event_id"] is None for a in during)
    # The write DB is the source of truth: the projector's catch-up gets them there anyway.
    await stack.assert_converges()
    redis.start()  # back, with its data gone

    async def all_published() -> bool:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{api.url}/stats")).json()["events_queued"] == 0

    await wait_until(all_published, 20, "queued events to be published")
    assert await stack.redis.xlen(stack.settings.event_stream_name) >= 100
    await write_many(api.url, 50, prefix="after")
    await stack.assert_converges()


async def test_redis_flushed_and_stream_trimmed(stack: Stack) -> None:
    api = await stack.launch("api")
    await write_many(api.url, 300, prefix="lost")
    stream = stack.settings.event_stream_name
    await stack.redis.xtrim(stream, maxlen=0)  # trimmed before anyone consumed it
    await stack.launch("projector")
    await stack.assert_converges()
    await stack.redis.flushall()  # the stream and the consumer group are gone
    await write_many(api.url, 300, prefix="flushed")
    await stack.assert_converges()


async def test_two_projectors_share_one_group(stack: Stack) -> None:
    first = await stack.launch("projector", PROJECTOR_BATCH_SIZE="20", CONSUMER_NAME="one")
    second = await stack.launch("projector", PROJECTOR_BATCH_SIZE="20", CONSUMER_NAME="two")
    api = await stack.launch("api")
    await write_many(api.url, 2000, keys=20)
    await stack.assert_converges()
    consumers = await stack.redis.xinfo_consumers(
        stack.settings.event_stream_name, stack.settings.consumer_group
    )
    assert {c["name"] for c in consumers} >= {b"one", b"two"}
    async with stack.read_engine.connect() as conn:
        shares = dict(
            (
                await conn.execute(
                    text("SELECT consumer, events_projected FROM projector_consumers")
                )
            ).all()
        )
    assert shares.get("one", 0) > 0 and shares.get("two", 0) > 0, shares
    assert first.process.poll() is None and second.process.poll() is None


async def test_poison_event_goes_to_the_dead_letter_stream(stack: Stack) -> None:
    await stack.launch("projector", PROJECTOR_MAX_DELIVERIES="3", PROJECTOR_CLAIM_IDLE_MS="200")
    api = await stack.launch("api")
    settings = stack.settings
    await stack.redis.xadd(settings.event_stream_name, {"type": "RecordCreated", "key": "x"})
    await write_many(api.url, 100, prefix="healthy")

    async def dead_lettered() -> bool:
        return await stack.redis.xlen(settings.dead_letter_stream) == 1

    await wait_until(dead_lettered, 20, "the poison event in the dead-letter stream")
    [(_, fields)] = await stack.redis.xrange(settings.dead_letter_stream)
    assert fields[b"dead_letter_deliveries"] == b"3"
    assert b"not a cqrs-stack event" in fields[b"dead_letter_reason"]
    await stack.assert_converges()
    pending = await stack.redis.xpending(settings.event_stream_name, settings.consumer_group)
    assert pending["pending"] == 0


async def test_duplicate_delivery_changes_nothing(stack: Stack) -> None:
    api = await stack.launch("api")
    await stack.launch("projector")
    await write_many(api.url, 200, keys=10)
    await stack.assert_converges()
    stream = stack.settings.event_stream_name
    # Deliver every event a second time, in reverse order.
    for _, fields in reversed(await stack.redis.xrange(stream)):
        await stack.redis.xadd(stream, fields)

    async def drained() -> bool:
        info = await stack.redis.xinfo_groups(stream)
        return (
            info[0]["pending"] == 0
            and info[0]["last-delivered-id"]
            == (await stack.redis.xinfo_stream(stream))["last-generated-id"]
        )

    await wait_until(drained, 20, "the duplicates to be consumed")
    await stack.assert_converges(timeout=1)
    assert await stack.scalar(stack.read_engine, "SELECT sum(write_count) FROM records") == 200


async def test_a_command_that_commits_late_is_not_skipped(stack: Stack) -> None:
    """Ids are drawn before commit: a low id committing after higher ones must still arrive."""
    api = await stack.launch("api")
    await stack.launch("projector")
    async with stack.write_engine.connect() as slow:
        await slow.execute(
            text(
                "INSERT INTO commands (key, value, event_type)"
                " VALUES ('late', 'v', 'RecordCreated')"
            )
        )
        late_id = await slow.scalar(text("SELECT currval('commands_id_seq')"))
        answers = await write_many(api.url, 100, prefix="early")
        assert min(a["position"] for a in answers) > late_id
        await stack.assert_converges()  # converged without the uncommitted one
        since = await stack.scalar(stack.read_engine, "SELECT now()")

        async def swept_past_them() -> bool:
            swept = await stack.scalar(
                stack.read_engine,
                "SELECT swept_at > CAST(:since AS timestamptz) + interval '1.5 seconds'"
                " FROM projector_catchup",
                since=since,
            )
            return bool(swept)

        await wait_until(swept_past_them, 20, "catch-up sweeps after the later commands")
        await slow.commit()  # committed late, and never published to the stream
    await stack.assert_converges()
    assert (
        await stack.scalar(stack.read_engine, "SELECT value FROM records WHERE key = 'late'") == "v"
    )


async def test_sigterm_drains_the_projector(stack: Stack) -> None:
    api = await stack.launch("api")
    await write_many(api.url, 2000)
    projector = await stack.launch("projector", PROJECTOR_BATCH_SIZE="100", CONSUMER_NAME="drainer")

    async def started() -> bool:
        return await applied(stack) > 0

    await wait_until(started, 20, "the projector to start")
    # uvicorn re-raises SIGTERM once its graceful shutdown is done: the drain comes first.
    assert await asyncio.to_thread(projector.terminate) in (0, -signal.SIGTERM)
    assert "projector stopped" in projector.log()
    assert "stopped role=projector" in projector.log()
    pending = await stack.redis.xpending_range(
        stack.settings.event_stream_name,
        stack.settings.consumer_group,
        "-",
        "+",
        10,
        consumername="drainer",
    )
    assert pending == [], "entries delivered to a drained projector must be acknowledged"
    await stack.launch("projector")
    await stack.assert_converges()


async def test_events_carry_what_the_projector_needs(stack: Stack) -> None:
    api = await stack.launch("api")
    [answer] = await write_many(api.url, 1)
    [(entry_id, fields)] = await stack.redis.xrange(stack.settings.event_stream_name)
    assert entry_id.decode() == answer["event_id"]
    command = events.decode(fields)
    assert (command.position, command.key, command.event_type) == (
        answer["position"],
        "k0",
        "RecordCreated",
    )
