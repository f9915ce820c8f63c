"""Publishing a batch's events (stream.publish) against a real Redis: one entry per command, in
order, in one round trip; the same where an ACL refuses scripts; an error reply leaves the
connection usable; and the client's CPU per event stays a few microseconds."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from cqrs_stack import events, stream
from cqrs_stack.events import RECORD_CREATED, RECORD_UPDATED, Command
from cqrs_stack.localservers import RedisServer

BATCH = 256  # WRITE_BATCH_MAX's default: the largest batch the write path publishes


def commands(count: int, first: int = 1) -> list[Command]:
    now = dt.datetime.now(dt.UTC)
    return [
        Command(
            first + i,
            f"key:{i}:é",  # non-ASCII: lengths are bytes, not characters
            "v" * (i % 7),  # including the empty value
            RECORD_CREATED if i % 2 else RECORD_UPDATED,
            now,
        )
        for i in range(count)
    ]


@pytest_asyncio.fixture
async def redis(redis_server: RedisServer, fresh_names: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, max_connections=1)
    yield client
    await client.aclose()


async def entries(redis: Redis, name: str) -> list[tuple[str, Command]]:
    return [(i.decode(), events.decode(f)) for i, f in await redis.xrange(name)]


@pytest.mark.parametrize("max_length", [0, 1_000_000])
async def test_one_entry_per_command_in_order(
    redis: Redis, fresh_names: str, max_length: int
) -> None:
    name = f"s-{fresh_names}"
    sent = commands(BATCH) + commands(BATCH + 1, first=BATCH + 1)
    ids = await stream.publish(redis, name, sent[:BATCH], max_length)
    ids += await stream.publish(redis, name, sent[BATCH:], max_length)
    assert await stream.publish(redis, name, [], max_length) == []
    stored = await entries(redis, name)
    assert [i for i, _ in stored] == ids
    assert [c for _, c in stored] == sent


async def test_trims_to_max_length(redis: Redis, fresh_names: str) -> None:
    name = f"s-{fresh_names}"
    for n in range(10):
        await stream.publish(redis, name, commands(BATCH, first=1 + n * BATCH), 100)
    # MAXLEN ~: trimmed by whole nodes (100 entries each by default), never below 100.
    assert 100 <= await redis.xlen(name) <= 2 * BATCH + 100


async def test_an_acl_without_eval_publishes_entry_by_entry(
    redis_server: RedisServer, fresh_names: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis user provisioned with XADD but not EVAL: the same entries, one XADD each."""
    monkeypatch.setattr(stream._Scripts, "refused", False)
    name = f"s-{fresh_names}"
    admin = Redis.from_url(redis_server.url)
    user = f"noeval-{fresh_names}"
    await admin.execute_command(
        "ACL", "SETUSER", user, "on", ">pw", f"~{name}", "-@all", "+xadd", "+ping", "+hello"
    )
    client = Redis(host="127.0.0.1", port=redis_server.port, username=user, password="pw")
    try:
        sent = commands(BATCH)
        ids = await stream.publish(client, name, sent[:10], 0)
        assert stream._Scripts.refused
        ids += await stream.publish(client, name, sent[10:], 1_000_000)
        stored = await entries(admin, name)
        assert [i for i, _ in stored] == ids
        assert [c for _, c in stored] == sent
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await client.aclose()
        await admin.aclose()


async def test_an_error_reply_is_raised_and_the_connection_reused(
    redis: Redis, fresh_names: str
) -> None:
    """A stream key of the wrong type: the batch fails as a whole, nothing is added, and the
    pool's one connection still answers in step."""
    wrong, right = f"w-{fresh_names}", f"s-{fresh_names}"
    await redis.set(wrong, "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await stream.publish(redis, wrong, commands(3), 0)
    ids = await stream.publish(redis, right, commands(3), 0)
    assert [i for i, _ in await entries(redis, right)] == ids
    assert await redis.get(wrong) == b"not a stream"


async def test_client_cpu_per_event_is_a_few_microseconds(redis: Redis, fresh_names: str) -> None:
    """The write path publishes every batch: redis-py's per-argument command packing and one
    reply per XADD cost ~17 µs of the API's CPU per event; one packed script costs ~3."""
    name = f"s-{fresh_names}"
    batch = commands(64)
    await stream.publish(redis, name, batch, 1_000_000)
    rounds = 100
    started = time.process_time()
    for _ in range(rounds):
        await stream.publish(redis, name, batch, 1_000_000)
    per_event = (time.process_time() - started) / rounds / len(batch)
    assert per_event < 8e-6, f"{per_event * 1e6:.1f} µs of CPU per event"
