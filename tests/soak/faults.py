"""The fault schedule: each fault acts on a real process or server and returns when it is over.

A fault returns a short note of what it did (shown in the report). Outages are a few seconds
long; the time the stack then needs to catch up is measured by the runner.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import text

from .cluster import Cluster

OUTAGE_SECONDS = 3.0
POISON = {"type": "RecordCreated", "key": "soak-poison", "note": "injected by the soak"}


async def projector_kill9(cluster: Cluster, number: int) -> str:
    """kill -9 a projector replica mid-work, then start a replacement (a new pod name)."""
    name, victim = next(iter(cluster.projectors.items()))
    victim.kill()
    del cluster.projectors[name]
    await cluster.launch_projector(f"projector-r{number}")
    return f"killed {name}, started projector-r{number}"


async def projector_sigstop(cluster: Cluster, number: int) -> str:
    """SIGSTOP a replica; the others must claim what it holds pending; SIGCONT after.

    A replica stopped between batches holds nothing. Then the soak reads a batch in its
    name (XREADGROUP as that consumer), as if it froze right after reading: those entries
    must be claimed by a live replica within the window.
    """
    name, victim = list(cluster.projectors.items())[-1]
    settings, redis = cluster.settings, cluster.stack.redis
    window = max(5.0, 6 * settings.projector_claim_idle_ms / 1000)
    os.kill(victim.process.pid, signal.SIGSTOP)
    handed = 0
    try:
        await asyncio.sleep(0.3)
        held = await _pending_of(cluster, name)
        if not held:
            reply = await redis.xreadgroup(
                settings.consumer_group, name, {settings.event_stream_name: ">"}, 20, 2000
            )
            handed = sum(len(entries) for _, entries in reply or [])
            held = await _pending_of(cluster, name)
        stopped = time.monotonic()
        pending, claimed_after = held, None
        while time.monotonic() < stopped + window:  # stays frozen for the whole window
            await asyncio.sleep(0.25)
            pending = await _pending_of(cluster, name)
            if not pending and claimed_after is None:
                claimed_after = time.monotonic() - stopped
    finally:
        os.kill(victim.process.pid, signal.SIGCONT)
    if pending:
        raise FaultFailed(f"{pending} entries still pending on stopped {name} after {window}s")
    how = f"handed {handed} in its name" if handed else "its own batch"
    return (
        f"{name} frozen {window:.0f}s holding {held} pending ({how});"
        f" claimed by others in {claimed_after or 0:.1f}s"
    )


async def _pending_of(cluster: Cluster, consumer: str) -> int:
    settings = cluster.settings
    try:
        summary = await cluster.stack.redis.xpending(
            settings.event_stream_name, settings.consumer_group
        )
    except Exception:  # the group may be gone right after a Redis restart
        return 0
    for entry in summary.get("consumers") or []:
        if entry["name"] in (consumer, consumer.encode()):
            return int(entry["pending"])
    return 0


async def redis_restart_wiped(cluster: Cluster, number: int) -> str:
    """Stop Redis, delete its data, start it again on the same port: stream and group gone."""
    server = cluster.redis_server
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(OUTAGE_SECONDS)
    for entry in server.data_dir.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name != "redis.log":
            entry.unlink()
    await asyncio.to_thread(server.start)
    return f"Redis down {OUTAGE_SECONDS:.0f}s, restarted empty"


async def redis_flushall(cluster: Cluster, number: int) -> str:
    """FLUSHALL with every client connected: stream, group and dead letters vanish under them.

    Unlike a restart, connections stay open: a projector blocked in XREADGROUP is answered
    with an error (Redis 7: "UNBLOCKED the stream key no longer exists"), not a disconnect.
    """
    await cluster.stack.redis.flushall()
    return "FLUSHALL while connected"


async def write_pg_restart(cluster: Cluster, number: int) -> str:
    """Fast shutdown of the write PostgreSQL server, then start it on the same data and port."""
    await _restart(cluster.write_pg.stop, cluster.write_pg.start)
    return f"write DB down {OUTAGE_SECONDS:.0f}s"


async def read_pg_restart(cluster: Cluster, number: int) -> str:
    """Fast shutdown of the read PostgreSQL server, then start it on the same data and port."""
    await _restart(cluster.read_pg.stop, cluster.read_pg.start)
    return f"read DB down {OUTAGE_SECONDS:.0f}s"


async def _restart(stop: Callable[[], None], start: Callable[[], None]) -> None:
    await asyncio.to_thread(stop)
    await asyncio.sleep(OUTAGE_SECONDS)
    await asyncio.to_thread(start)


async def slow_read_db(cluster: Cluster, number: int) -> str:
    """Hold a lock that blocks every write to ``records`` (reads go on) for a few seconds."""
    async with cluster.stack.read_engine.begin() as conn:
        await conn.execute(text("LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE"))
        await asyncio.sleep(OUTAGE_SECONDS + 1)
    return f"records locked {OUTAGE_SECONDS + 1:.0f}s"


async def poison_event(cluster: Cluster, number: int) -> str:
    """XADD an entry that is not a cqrs-stack event: it must end in the dead-letter stream."""
    entry = await cluster.stack.redis.xadd(
        cluster.settings.event_stream_name, {**POISON, "number": str(number)}
    )
    return f"poison entry {entry.decode()}"


class FaultFailed(AssertionError):
    """A fault's own expectation did not hold (e.g. entries were not reclaimed)."""


Fault = Callable[[Cluster, int], Awaitable[str]]

# One cycle of the schedule. The poison comes after the Redis wipes, so the one injected
# last is still in the dead-letter stream at the end.
SCHEDULE: list[tuple[str, Fault]] = [
    ("projector kill -9", projector_kill9),
    ("slow read DB (lock)", slow_read_db),
    ("Redis restart, data gone", redis_restart_wiped),
    ("projector SIGSTOP", projector_sigstop),
    ("write DB restart", write_pg_restart),
    ("Redis FLUSHALL", redis_flushall),
    ("read DB restart", read_pg_restart),
    ("poison event", poison_event),
]

# Faults after which the dead-letter stream is empty again.
WIPES_REDIS = {redis_restart_wiped, redis_flushall}
