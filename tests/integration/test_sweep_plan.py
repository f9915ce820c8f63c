"""The catch-up sweep's page query reads the (txid, id) index in transaction order and stops
at its limit: its cost is the page, whatever the table holds."""

from __future__ import annotations

import re

from sqlalchemy import text

from cqrs_stack import sweep
from cqrs_stack.projector import CATCHUP_GRACE_SECONDS
from tests.fixtures.stack import Stack


async def test_the_page_query_is_an_index_scan_in_transaction_order(stack: Stack) -> None:
    async with stack.write_engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO commands (key, value, event_type)"
                " SELECT 'k' || g, 'v', 'RecordCreated' FROM generate_series(1, 20000) g"
            )
        )
        await conn.execute(text("ANALYZE commands"))
    params = {"grace": CATCHUP_GRACE_SECONDS, "txid": 0, "position": 0, "limit": 100}
    async with stack.write_engine.connect() as conn:
        plan = [
            row[0]
            for row in await conn.execute(
                text(f"EXPLAIN (ANALYZE, FORMAT TEXT) {sweep.AFTER_CURSOR.text}"), params
            )
        ]
    shown = "\n".join(plan)
    assert "commands_txid_id_idx" in shown, shown
    # No sort: a sort (of the text form of txid) would read every row past the cursor first.
    assert "Sort" not in shown, shown
    assert "rows=100" in next(line for line in plan if "Index Scan" in line), shown


_SEED = """
    INSERT INTO commands (key, value, event_type, published)
    SELECT 'seed:' || g, 'v', 'RecordCreated', true FROM generate_series(1, CAST(:n AS bigint)) g
"""
_NEW = """
    INSERT INTO commands (key, value, event_type)
    SELECT 'new:' || g, 'v', 'RecordUpdated' FROM generate_series(1, CAST(:n AS bigint)) g
"""
# New commands behind the cursor, in this many transactions, at both sizes.
NEW_COMMANDS, NEW_TRANSACTIONS = 1000, 10


async def _seed_then_new(stack: Stack, seeded: int) -> tuple[int, int]:
    """Seed ``seeded`` commands in one transaction, then the new ones in several; the cursor
    of a sweep that has swept the seeded ones (its last row in (txid, id) order)."""
    async with stack.write_engine.begin() as conn:
        await conn.execute(text(_SEED), {"n": seeded})
        row = (
            await conn.execute(text("SELECT pg_current_xact_id()::text, max(id) FROM commands"))
        ).one()
    for _ in range(NEW_TRANSACTIONS):
        async with stack.write_engine.begin() as conn:
            await conn.execute(text(_NEW), {"n": NEW_COMMANDS // NEW_TRANSACTIONS})
    async with stack.write_engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE commands"))
    return int(row[0]), int(row[1])


async def _page_cost(stack: Stack, cursor: tuple[int, int]) -> tuple[int, float, str]:
    """Buffers touched and the least execution time (ms, of five) of the sweep's page query
    from ``cursor``, with a limit far above the new commands; and its plan."""
    params = {"grace": 0.0, "txid": cursor[0], "position": cursor[1], "limit": 50_000}
    times: list[float] = []
    buffers = 0
    plan: list[str] = []
    async with stack.write_engine.connect() as conn:
        for _ in range(5):
            plan = [
                row[0]
                for row in await conn.execute(
                    text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) {sweep.AFTER_CURSOR.text}"),
                    params,
                )
            ]
            executed = next(line for line in plan if line.startswith("Execution Time"))
            times.append(float(executed.split(":")[1].split()[0]))
            top = next(line for line in plan if "Buffers:" in line)
            buffers = sum(
                int(part.split("=")[1]) for part in top.split(":")[1].split() if "=" in part
            )
    shown = "\n".join(plan)
    assert "commands_txid_id_idx" in shown and "Sort" not in shown, shown
    scan = next(line for line in plan if "Index Scan" in line)
    # Only the new ones read (PostgreSQL 18 prints actual rows with decimals).
    assert re.search(rf"actual .*rows={NEW_COMMANDS}(\.0+)? ", scan), shown
    return buffers, min(times), shown


async def test_a_sweep_page_costs_the_new_commands_not_the_table(stack: Stack) -> None:
    """The same 1,000 new commands behind the cursor with 100,000 and with 1,000,000 rows in
    the table (seeded by SQL): the same index range read, the same pages and time."""
    small = await _page_cost(stack, await _seed_then_new(stack, 100_000))
    large = await _page_cost(stack, await _seed_then_new(stack, 900_000))
    # Pages: the same leaf and heap pages, plus at most a level of the index's height.
    assert large[0] <= small[0] * 1.2 + 5, (small, large)
    # Time: noisy on a shared machine, hence the least of five and a wide margin; a scan that
    # grew with the table would take ten times as long.
    assert large[1] <= small[1] * 3 + 2.0, (small, large)
