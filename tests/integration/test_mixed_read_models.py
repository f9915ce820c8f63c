"""Replicas whose READ_MODELS differ (a rolling update enabling a model, one misconfigured
replica): each model is still applied exactly once, and the sweep of a replica that keeps a
model repairs what a replica without it acknowledged from the stream."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from sqlalchemy import text

from cqrs_stack.db import driver_of
from cqrs_stack.projections import by_name
from cqrs_stack.projections.base import applied_count
from tests.fixtures.stack import Stack, wait_until
from tests.integration.test_guarantees import write_many


async def test_a_replica_keeping_history_repairs_what_a_records_only_one_acknowledged(
    stack: Stack,
) -> None:
    api = await stack.launch("api")
    narrow = await stack.launch("projector", READ_MODELS="records")
    await write_many(api.url, 120, prefix="a", keys=7)
    await stack.assert_converges()  # records, the only model of stack.env so far
    async with stack.read_engine.connect() as conn:
        written = await conn.scalar(text("SELECT now()"))

    async def swept_past_them() -> bool:
        # Past the sweep's grace period for the last write: the records-only replica's sweep
        # has looked at every one of them.
        async with stack.read_engine.connect() as conn:
            return bool(
                await conn.scalar(
                    text(
                        "SELECT bool_and(swept_at > CAST(:t AS timestamptz)"
                        " + interval '1.5 seconds') FROM projector_catchup"
                    ),
                    {"t": written},
                )
            )

    await wait_until(swept_past_them, 15, "the records-only replica's sweep past the writes")
    # The replica keeping history starts, the records-only one goes on beside it.
    stack.env["READ_MODELS"] = "records,history"
    await stack.launch("projector")
    await write_many(api.url, 80, prefix="b", keys=5)
    await stack.assert_converges(timeout=15)  # records and history equal their functions
    history = by_name("history")
    async with stack.read_engine.connect() as conn:
        raw = await driver_of(conn)
        assert await applied_count(raw, history) == 200  # every command, exactly once
        assert await conn.scalar(text("SELECT count(*) FROM history")) == 200
    await wait_until(
        lambda: _logged(narrow.log(), "read models kept by another replica are not enabled"),
        10,
        "the records-only replica's warning",
    )
    assert "models=history" in narrow.log()
    narrow_status = await asyncio.to_thread(status, stack, "records")
    assert narrow_status["read_models_not_enabled_here"] == ["history"]
    assert (await asyncio.to_thread(status, stack, "records,history"))[
        "read_models_not_enabled_here"
    ] == []


def status(stack: Stack, read_models: str) -> dict[str, Any]:
    """``cqrs-stack status --json`` of a process with ``read_models``."""
    done = subprocess.run(
        [sys.executable, "-m", "cqrs_stack.cli", "status", "--json"],
        env={**os.environ, **stack.env, "READ_MODELS": read_models},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


async def _logged(log: str, line: str) -> bool:
    return line in log
