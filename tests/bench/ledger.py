"""Benchmark phase: the ledger's size after many commands, before and after pruning.

The write DB is seeded with SQL (not through the API), and the ledger with a row per seeded
command, as the projectors leave it before any pruning (a rebuild writes none: its watermark
covers its snapshot); then the ledger's pruning runs to the top and a VACUUM hands the space
back.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from cqrs_stack.config import Settings
from cqrs_stack.db import create_engine, create_pool
from cqrs_stack.projections.ledger import LedgerPruner
from cqrs_stack.projections.records import Records

if TYPE_CHECKING:
    from .phases import Bench

# Commands seeded: the issue's figure in the full run, a few seconds' worth in the quick one.
FULL_COMMANDS = 1_000_000
QUICK_COMMANDS = 20_000

_SIZE = (
    f"SELECT pg_total_relation_size('{Records.ledger}'), (SELECT count(*) FROM {Records.ledger})"
)


async def ledger_size(write_url: str, read_url: str, commands: int) -> dict[str, Any]:
    """Seed ``commands`` commands, rebuild, measure the ledger, prune it, measure again."""
    settings = Settings(write_db_url=write_url, read_db_url=read_url)
    write_engine = create_engine(write_url, settings, application_name="bench-ledger")
    pool = await create_pool(read_url, settings, application_name="bench-ledger")
    try:
        async with write_engine.begin() as conn:
            seeded = await conn.execute(
                text(
                    "INSERT INTO commands (key, value, event_type, published)"
                    " SELECT 'ledger:' || (i % 100000), 'v', 'RecordUpdated', true"
                    " FROM generate_series(1, :n) AS i RETURNING id"
                ),
                {"n": commands},
            )
            ids = [int(position) for position in seeded.scalars()]
        async with pool.acquire() as conn:
            await conn.execute(
                f"INSERT INTO {Records.ledger} (command_id) SELECT unnest($1::bigint[])"
                " ON CONFLICT DO NOTHING",
                ids,
            )
        async with pool.acquire() as conn:
            bytes_before, rows_before = await conn.fetchrow(_SIZE)
        pruner = LedgerPruner(write_engine, pool, [Records], settings.ledger_prune_step)
        started = time.perf_counter()
        pruned = 0
        for _ in range(1000):  # two rounds: a fence, then the rise to it
            step = await pruner.prune_round() + await pruner.prune_round()
            pruned += step
            if not step:
                break
        seconds = time.perf_counter() - started
        async with pool.acquire() as conn:
            await conn.execute(f"VACUUM {Records.ledger}")
            bytes_after, rows_after = await conn.fetchrow(_SIZE)
            watermark = await conn.fetchval(f"SELECT position FROM {Records.watermark()}")
    finally:
        await pool.close()
        await write_engine.dispose()
    figures = {
        "commands": commands,
        "rows_before": int(rows_before),
        "bytes_before": int(bytes_before),
        "rows_after": int(rows_after),
        "bytes_after_vacuum": int(bytes_after),
        "pruned": pruned,
        "prune_seconds": round(seconds, 2),
        "watermark": int(watermark),
    }
    print(f"bench: ledger: {figures}", file=sys.stderr)
    return figures


async def ledger_phase(bench: Bench) -> None:
    """The phase: ``ledger_size`` on the bench stack's databases, after the other phases."""
    commands = FULL_COMMANDS if bench.plan.name == "full" else QUICK_COMMANDS
    env = bench.stack.env
    bench.results["ledger"] = await ledger_size(env["WRITE_DB_URL"], env["READ_DB_URL"], commands)
