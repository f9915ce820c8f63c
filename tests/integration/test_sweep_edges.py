"""The catch-up sweep at its edges: values near the size limit, a transaction left open, a
sweeper frozen while it holds the election. Commands are lost from the stream by writing them
with SQL straight into the write DB, so only the sweep can bring them to the read model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cqrs_stack.projector import _CATCHUP_LOCK_KEY
from tests.fixtures.stack import ServiceProcess, Stack, wait_until
from tests.integration.test_rebuild import rebuild_command

MIB = 1024 * 1024

# Each model row: key, md5 of the value, created_at, updated_at, write_count. Computed in the
# databases, so that checking a read model of gigabytes moves kilobytes.
_EXPECTED_DIGEST = """
    SELECT c.key, md5(c.value), k.first_at, c.created_at, k.commands
    FROM (SELECT key, max(id) AS last_id, count(*) AS commands,
                 (array_agg(created_at ORDER BY id))[1] AS first_at
          FROM commands GROUP BY key) AS k
    JOIN commands AS c ON c.id = k.last_id
    ORDER BY c.key
"""
_ACTUAL_DIGEST = """
    SELECT key, md5(value), created_at, updated_at, write_count FROM records ORDER BY key
"""


async def _rows(engine: AsyncEngine, sql: str) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(sql))]


async def _digests_match(stack: Stack) -> bool:
    expected = await _rows(stack.write_engine, _EXPECTED_DIGEST)
    return expected == await _rows(stack.read_engine, _ACTUAL_DIGEST)


def proc_status(process: ServiceProcess) -> str:
    """The kernel's /proc status of the process (a small file: reading it never blocks)."""
    return Path(f"/proc/{process.process.pid}/status").read_text()


def peak_rss_bytes(process: ServiceProcess) -> int:
    """The process's peak resident set size so far (VmHWM)."""
    for line in proc_status(process).splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


async def lose_commands(stack: Stack, count: int, value_sql: str, keys: int = 50) -> None:
    """Store ``count`` commands that never reach the stream (as if Redis lost them)."""
    async with stack.write_engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO commands (key, value, event_type)"
                f" SELECT 'k' || (i % {keys}), {value_sql}, 'RecordCreated'"
                " FROM generate_series(1, :count) AS i"
            ),
            {"count": count},
        )


async def test_values_of_a_gigabyte_and_more_converge_in_bounded_memory(stack: Stack) -> None:
    # 1,100 values of 1,000,000 bytes: 1.1e9 bytes, over PostgreSQL's 1 GiB statement limit.
    seeded = time.monotonic()
    await lose_commands(stack, 1100, "repeat(md5(i::text), 31250)", keys=5)
    print(f"seeded in {time.monotonic() - seeded:.1f}s")
    total = await stack.scalar(stack.write_engine, "SELECT sum(octet_length(value)) FROM commands")
    assert total > 1024 * MIB
    projector = await stack.launch("projector")
    started = time.monotonic()
    await wait_until(lambda: _digests_match(stack), 90, "the sweep to apply 1.1 GB")
    peak = peak_rss_bytes(projector)
    budget = stack.settings.projector_batch_max_bytes
    # The README's bound: the process at rest plus four times PROJECTOR_BATCH_MAX_BYTES.
    assert peak < 200 * MIB + 4 * budget, f"peak RSS {peak / MIB:.0f} MiB"
    print(f"swept 1.1 GB in {time.monotonic() - started:.1f}s, peak RSS {peak / MIB:.0f} MiB")


async def test_large_stream_batches_are_split_by_bytes(stack: Stack) -> None:
    api = await stack.launch("api")
    payload = {"value": "v" * 1_000_000}
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        for i in range(120):
            answer = await client.post("/write", json={"key": f"big{i % 10}", **payload})
            assert answer.status_code == 200, answer.text
            assert answer.json()["queued"] is False
    # 120 MB waiting in the stream; the sweep is kept out so that the stream path does it all.
    # The smallest budget (1 MiB) is below the largest possible entry: one entry at a time.
    budget = MIB
    projector = await stack.launch(
        "projector", PROJECTOR_BATCH_MAX_BYTES=str(budget), PROJECTOR_CATCHUP_INTERVAL="3600"
    )
    await wait_until(lambda: _digests_match(stack), 60, "the stream to be projected")
    peak = peak_rss_bytes(projector)
    assert peak < 200 * MIB + 4 * budget, f"peak RSS {peak / MIB:.0f} MiB"
    assert "refused" not in projector.log()


async def test_sweep_moves_past_a_transaction_left_open(stack: Stack) -> None:
    """An open transaction pins xmin; the sweep must still cover 60,000 commands beyond it."""
    async with stack.write_engine.connect() as held:
        await held.execute(
            text(
                "INSERT INTO commands (key, value, event_type)"
                " VALUES ('held', 'v', 'RecordCreated')"
            )
        )
        # 60,000 lost commands: more than one sweep page (50,000), all beyond the open xid.
        await lose_commands(stack, 60_000, "'v' || i", keys=1000)
        await stack.launch("projector")
        await stack.assert_converges(timeout=40)  # while that transaction is still open
        held_xid = await held.scalar(text("SELECT pg_current_xact_id()::text"))
        pending = await stack.scalar(
            stack.read_engine, "SELECT array_agg(txid::text) FROM projector_catchup_pending"
        )
        assert held_xid in pending, "the open transaction is remembered, not re-read"
        cursor_id = await stack.scalar(stack.read_engine, "SELECT cursor_id FROM projector_catchup")
        assert cursor_id == 60_001, "the cursor went past all of them"
        # Later sweeps cost what is new (nothing), not the 60,000 behind the open transaction.
        rows_read = await _rows_read_by_sweeps(stack, sweeps=4)
        assert rows_read < 50_000, f"{rows_read} rows read by 4 sweeps with nothing new"
        await held.commit()  # ends late: its command is swept all the same
    await stack.assert_converges()
    assert await stack.scalar(stack.read_engine, "SELECT value FROM records WHERE key = 'held'")


async def _rows_read_by_sweeps(stack: Stack, sweeps: int) -> int:
    """Rows of ``commands`` fetched through an index while ``sweeps`` more sweeps run."""
    fetched = "SELECT idx_tup_fetch FROM pg_stat_user_tables WHERE relname = 'commands'"
    before = await stack.scalar(stack.write_engine, fetched)
    since = await stack.scalar(stack.read_engine, "SELECT swept_at FROM projector_catchup")
    interval = stack.settings.projector_catchup_interval

    async def swept_again() -> bool:
        swept = await stack.scalar(
            stack.read_engine,
            "SELECT swept_at > CAST(:since AS timestamptz) + make_interval(secs => :wait)"
            " FROM projector_catchup",
            since=since,
            wait=interval * (sweeps - 0.5),
        )
        return bool(swept)

    await wait_until(swept_again, 20, f"{sweeps} more sweeps")
    # The sweeper's own backend reports its counts when it goes idle, at most once a second.
    await asyncio.sleep(1.5)
    return int(await stack.scalar(stack.write_engine, fetched)) - int(before)


async def test_a_frozen_sweeper_loses_the_election(stack: Stack) -> None:
    sweep_timeout = 4.0
    settings = {
        "PROJECTOR_SWEEP_TIMEOUT": str(sweep_timeout),
        "PROJECTOR_CATCHUP_INTERVAL": "0.5",
    }
    await lose_commands(stack, 200, "'v' || i")
    async with stack.read_engine.connect() as blocker:
        # Hold the first sweeper inside its election transaction, then freeze it there.
        await blocker.execute(text("LOCK TABLE applied_commands IN ACCESS EXCLUSIVE MODE"))
        frozen = await stack.launch("projector", CONSUMER_NAME="frozen", **settings)

        async def sweeper_blocked() -> bool:
            waiting = await stack.scalar(
                stack.read_engine,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cqrs-projector'"
                " AND wait_event_type = 'Lock' AND query LIKE '%applied_commands%'",
            )
            return bool(waiting)

        await wait_until(sweeper_blocked, 20, "the sweeper to hold the election")
        os.kill(frozen.process.pid, signal.SIGSTOP)
        await blocker.rollback()
    try:
        other = await stack.launch("projector", CONSUMER_NAME="other", **settings)
        # Failover within PROJECTOR_SWEEP_TIMEOUT plus two sweep intervals (README), and a
        # second for the sweep itself.
        await stack.assert_converges(timeout=sweep_timeout + 2 * 0.5 + 1)
        assert "catch-up applied" in other.log()
        assert "(stopped)" in proc_status(frozen), "taken over while the holder is still frozen"
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)


# The session holding the sweep election (the advisory lock's key split in two 32-bit halves).
_SWEEPER = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    f" AND classid::bigint = {_CATCHUP_LOCK_KEY >> 32}"
    f" AND objid::bigint = {_CATCHUP_LOCK_KEY & 0xFFFFFFFF}"
)


async def test_a_rebuild_swaps_while_a_long_sweep_runs(stack: Stack) -> None:
    """A sweep round of large values lasts far longer than all of a swap's tries (3 x 0.1 s
    here): the swap must not wait for it, and the model is right once both are done."""
    # 600 x 1 MB over 10 keys: the round (one value per piece) outlasts the rebuild's load
    # and its verify of one key (60 MB), so the two overlap.
    await lose_commands(stack, 600, "repeat(md5(i::text), 31250)", keys=10)
    # One value per piece: the round lasts seconds.
    await stack.launch("projector", PROJECTOR_BATCH_MAX_BYTES=str(MIB))

    async def sweeping() -> bool:
        applied = await stack.scalar(stack.read_engine, "SELECT count(*) FROM applied_commands")
        return 0 < applied < 100

    await wait_until(sweeping, 30, "a sweep round to be under way")
    sweeper = await stack.scalar(stack.read_engine, _SWEEPER)
    swept_at = await stack.scalar(stack.read_engine, "SELECT swept_at FROM projector_catchup")
    # Verify one key only: checking every key (all the values again) can outlast the round,
    # and the round must still be under way at the swap for this test to say anything.
    args, env = rebuild_command(
        stack, REBUILD_SWAP_ATTEMPTS="3", REBUILD_LOCK_TIMEOUT="0.1", REBUILD_VERIFY_SAMPLE="1"
    )
    done = await asyncio.to_thread(
        subprocess.run, args, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The same round was still going when the rebuild had swapped.
    assert await stack.scalar(stack.read_engine, _SWEEPER) == sweeper
    assert (
        await stack.scalar(stack.read_engine, "SELECT swept_at FROM projector_catchup") == swept_at
    )
    await wait_until(lambda: _digests_match(stack), 60, "the model to be the commands'")
    await stack.assert_converges()


async def test_a_command_stamped_in_the_future_does_not_hold_the_sweep(stack: Stack) -> None:
    """One command stamped 20 minutes ahead (a clock stepped back, a back-filled row), then
    60,000 lost commands, more than one sweep page (50,000): all of them converge, long before
    that time comes."""
    async with stack.write_engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO commands (key, value, event_type, created_at)"
                " VALUES ('ahead', 'v', 'RecordCreated', now() + interval '20 minutes')"
            )
        )
    await lose_commands(stack, 60_000, "'v' || i", keys=1000)
    await stack.launch("projector")
    await stack.assert_converges(timeout=40)
    cursor_id = await stack.scalar(stack.read_engine, "SELECT cursor_id FROM projector_catchup")
    assert cursor_id == 60_001, "the cursor went past all of them"
