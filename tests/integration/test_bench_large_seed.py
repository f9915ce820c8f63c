"""The benchmark's large-data seed is a writer as the ledger's pruning expects one: a pruning
round that runs while the seed's ledger rows are written, before its commands exist, cannot
raise the watermark over them (it would leave them below it, all deleted at once later)."""

from __future__ import annotations

import asyncpg

from cqrs_stack.config import Settings, plain_database_url
from cqrs_stack.db import create_pool
from cqrs_stack.projections.ledger import LedgerPruner
from cqrs_stack.projections.records import Records
from tests.bench.phases import seed_large
from tests.fixtures.stack import Stack

KEYS = 30  # ten commands each
STEP = 100  # the pruner's smallest step: the seed spans three


async def test_a_pruning_round_during_the_seed_leaves_no_ledger_row_below_the_watermark(
    stack: Stack,
) -> None:
    settings = Settings(
        write_db_url=stack.env["WRITE_DB_URL"], read_db_url=stack.env["READ_DB_URL"]
    )
    write_conn = await asyncpg.connect(plain_database_url(settings.write_db_url))
    read_conn = await asyncpg.connect(plain_database_url(settings.read_db_url))
    pool = await create_pool(settings.read_db_url, settings, application_name="test-seed")
    pruner = LedgerPruner(stack.write_engine, pool, [Records], STEP)
    watermark = f"SELECT position FROM {Records.watermark()}"
    below = f"SELECT count(*) FROM {Records.ledger} WHERE command_id <= ({watermark})"
    try:

        async def prune_rounds() -> None:
            for _ in range(3):  # a fence, then the rise to it, and one more
                await pruner.prune_round()

        seed = await seed_large(write_conn, read_conn, KEYS, in_window=prune_rounds)
        assert seed.last - seed.first + 1 == KEYS * 10
        # The fence taken in the seed's window waited for it: nothing rose over its ids.
        assert await pool.fetchval(watermark) < seed.first
        assert await pool.fetchval(below) == 0
        # Once it committed, the pruner rises over the seed and prunes its rows, counting them.
        for _ in range(20):
            await pruner.prune_round()
            if await pool.fetchval(watermark) >= seed.last:
                break
        assert await pool.fetchval(watermark) >= seed.last
        assert await pool.fetchval(below) == 0
        pruned = await pool.fetchval(f"SELECT pruned FROM {Records.watermark()}")
        assert pruned == KEYS * 10
    finally:
        await pool.close()
        await write_conn.close()
        await read_conn.close()
