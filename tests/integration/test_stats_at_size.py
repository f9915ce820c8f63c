"""/stats at size: exact counts up to STATS_EXACT_COUNT_MAX rows, the planner's estimate one
past it (an exact count of millions of rows takes seconds), flagged as such."""

from __future__ import annotations

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cqrs_stack import read_db
from cqrs_stack.db import EXACT_COUNT_BYTES_PER_ROW
from cqrs_stack.projections.records import Records
from tests.fixtures.stack import Stack

BOUND = 1000

_COMMANDS = """
    INSERT INTO commands (key, value, event_type, published)
    SELECT 'size:' || g, 'v', 'RecordCreated', true FROM generate_series(1, CAST(:n AS bigint)) g
"""
_RECORDS = """
    INSERT INTO records (key, value, created_at, updated_at, write_count, first_command_id,
                         last_command_id)
    SELECT 'size:' || g, 'v', now(), now(), 1, g, g
    FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) g
"""
_LEDGER = """
    INSERT INTO applied_commands
    SELECT g FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) g
"""


async def run(engine: AsyncEngine, *statements: tuple[str, dict[str, int]]) -> None:
    async with engine.begin() as conn:
        for sql, params in statements:
            await conn.execute(text(sql), params)


async def analyze(stack: Stack) -> None:
    # ANALYZE records rows per page; autovacuum does the same in production, later.
    for engine, tables in (
        (stack.write_engine, ("commands",)),
        (stack.read_engine, ("records", "applied_commands")),
    ):
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in tables:
                await conn.execute(text(f"ANALYZE {table}"))


async def test_counts_exact_at_the_bound_and_estimated_past_it(stack: Stack) -> None:
    api = await stack.launch("api", STATS_EXACT_COUNT_MAX=str(BOUND))
    await run(stack.write_engine, (_COMMANDS, {"n": BOUND}))
    await run(
        stack.read_engine,
        (_RECORDS, {"first": 1, "last": BOUND}),
        (_LEDGER, {"first": 1, "last": BOUND}),
    )
    await analyze(stack)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        at_bound = (await client.get("/stats")).json()
        assert at_bound["counts_estimated"] is False
        assert at_bound["write_db_records"] == BOUND
        assert at_bound["read_db_records"] == BOUND
        assert at_bound["events_published"] == BOUND
        assert at_bound["lag_events"] == 0

        # Ten times the bound: the estimate, from rows per page times pages, flagged.
        more = 10 * BOUND
        await run(stack.write_engine, (_COMMANDS, {"n": more - BOUND}))
        await run(
            stack.read_engine,
            (_RECORDS, {"first": BOUND + 1, "last": more}),
            (_LEDGER, {"first": BOUND + 1, "last": more}),
        )
        await analyze(stack)
        past = (await client.get("/stats")).json()
    assert past["counts_estimated"] is True
    for field in ("write_db_records", "read_db_records", "events_published"):
        assert abs(past[field] - more) <= more // 10, (field, past[field])
    # Two estimates would differ by more than the lag: it comes from positions then.
    assert past["lag_events"] == past["last_written_position"] - past["last_projected_position"]
    assert past["lag_events"] == 0


async def test_a_table_never_analyzed_is_counted_exactly(stack: Stack) -> None:
    """No rows-per-page figure yet: counting is the only answer (and right)."""
    api = await stack.launch("api", STATS_EXACT_COUNT_MAX="10")
    await run(stack.write_engine, (_COMMANDS, {"n": 50}))
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        stats = (await client.get("/stats")).json()
    assert stats["write_db_records"] == 50


async def test_a_ledger_past_the_bound_is_estimated_not_counted(stack: Stack) -> None:
    """Right after a rebuild's swap (or a bulk load) the ledger holds a row per command, ten
    per key, until the pruning catches up. Counting it exactly for /stats, /metrics and
    `cqrs-stack status` cost 190 ms at 10 million rows: past the bound it is estimated."""
    await run(stack.read_engine, (_LEDGER, {"first": 1, "last": 10 * BOUND}))
    await analyze(stack)
    # The planner's figure now says 10 x BOUND rows while the table holds none: a figure
    # that follows it was estimated, one that says 0 was counted.
    async with stack.read_engine.begin() as conn:
        await conn.execute(text("DELETE FROM applied_commands"))
    figures = await read_db.projector_figures(stack.read_engine, BOUND)
    assert figures["applied_commands_estimated"] is True
    assert abs(figures["applied_commands"] - 10 * BOUND) <= BOUND
    (model,) = (await read_db.model_figures(stack.read_engine, [Records], BOUND)).values()
    assert model["estimated"] is True
    assert abs(model["ledger_rows"] - 10 * BOUND) <= BOUND
    # At the bound the same tables are counted: exact, and 0.
    exact = await read_db.projector_figures(stack.read_engine, 100 * BOUND)
    assert (exact["applied_commands"], exact["applied_commands_estimated"]) == (0, False)


async def test_a_few_rows_in_a_large_table_are_estimated_not_counted(stack: Stack) -> None:
    """A ledger pruned from the front after a bulk load (or a rebuild) keeps its pages: VACUUM
    cannot shorten a table whose live rows sit at its end, so counting its few rows reads every
    page (200 ms at 10 million rows' worth). Past EXACT_COUNT_BYTES_PER_ROW bytes of heap per
    row of the bound it is estimated, and after VACUUM the estimate is the rows left."""
    loaded, left = 20 * BOUND, BOUND // 2  # 20,000 ledger rows: about 720 kB of heap
    await run(stack.read_engine, (_LEDGER, {"first": 1, "last": loaded}))
    async with stack.read_engine.begin() as conn:
        await conn.execute(
            text(f"DELETE FROM applied_commands WHERE command_id <= {loaded - left}")
        )
    async with stack.read_engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM applied_commands"))
        size = await conn.scalar(text("SELECT pg_relation_size('applied_commands')"))
    assert size > BOUND * EXACT_COUNT_BYTES_PER_ROW, size  # fewer rows than the bound, not bytes
    figures = await read_db.projector_figures(stack.read_engine, BOUND)
    assert (figures["applied_commands"], figures["applied_commands_estimated"]) == (left, True)
    # A bound whose bytes the table is within: counted, exact.
    exact_max = size // EXACT_COUNT_BYTES_PER_ROW
    exact = await read_db.projector_figures(stack.read_engine, exact_max)
    assert (exact["applied_commands"], exact["applied_commands_estimated"]) == (left, False)
