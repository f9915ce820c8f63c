"""The catch-up sweep's page query reads the (txid, id) index in transaction order and stops
at its limit: its cost is the page, whatever the table holds."""

from __future__ import annotations

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
