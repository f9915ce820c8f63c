"""The write path's two stages: the next batch commits while the last one publishes, and
batches still answer only after their own commit, in commit order."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import httpx

from cqrs_stack.localservers import RedisServer
from tests.fixtures.stack import Stack, wait_until

REDIS_WAIT = 3.0  # REDIS_TIMEOUT here: how long the first batch's publish hangs


async def committed(stack: Stack, key: str) -> bool:
    found = await stack.scalar(
        stack.write_engine, "SELECT count(*) FROM commands WHERE key = :k", k=key
    )
    return int(found) == 1


async def test_the_next_batch_commits_while_one_publishes(
    stack: Stack, redis_factory: Callable[[], RedisServer]
) -> None:
    redis = redis_factory()
    stack.use_redis(redis)
    api = await stack.launch("write-api", REDIS_TIMEOUT=str(REDIS_WAIT))
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        warm = await client.post("/write", json={"key": "warm", "value": "v"})
        assert warm.json()["queued"] is False
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)  # the first batch's XADD hangs
        try:
            first = asyncio.create_task(client.post("/write", json={"key": "a", "value": "v"}))
            await wait_until(lambda: committed(stack, "a"), 10, "the first write's commit")
            a_committed = time.monotonic()
            second = asyncio.create_task(client.post("/write", json={"key": "b", "value": "v"}))
            await wait_until(lambda: committed(stack, "b"), 10, "the second write's commit")
            # One stage at a time would commit it only once the first batch's publish gave up.
            waited = time.monotonic() - a_committed
            assert waited < REDIS_WAIT / 2, f"the second batch committed {waited:.1f}s later"
            assert not first.done() and not second.done()  # answered only after publishing
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        first_answer, second_answer = await first, await second
    assert first_answer.status_code == second_answer.status_code == 200
    a, b = first_answer.json(), second_answer.json()
    assert a["position"] < b["position"]
    assert (a["key"], b["key"]) == ("a", "b")

    async def all_published() -> bool:
        left = await stack.scalar(
            stack.write_engine, "SELECT count(*) FROM commands WHERE NOT published"
        )
        return int(left) == 0

    await wait_until(all_published, 30, "the queued events to be published")
    entries = await stack.redis.xrange(stack.settings.event_stream_name)
    keys = [fields[b"key"] for _, fields in entries]
    assert keys.count(b"a") >= 1 and keys.count(b"b") >= 1
    # Stream order follows commit order: a's first entry comes before b's.
    assert keys.index(b"a") < keys.index(b"b")
