"""The operational commands against a real stack: migrate, status, verify."""

from __future__ import annotations

import json
import subprocess
import sys

from sqlalchemy import text

from tests.fixtures.stack import Stack
from tests.integration.test_guarantees import write_many


def cqrs_stack(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``cqrs-stack ARGS`` with the stack's configuration."""
    return subprocess.run(
        [sys.executable, "-m", "cqrs_stack.cli", *args],
        env={**stack.env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_migrate_is_idempotent(stack: Stack) -> None:
    done = cqrs_stack(stack, "migrate")  # the fixture migrated already
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "schema up to date"


async def test_migrate_reports_the_versions_reached_and_expected(stack: Stack, tmp_path) -> None:
    """MIGRATE_REPORT_FILE: what the operator's migration Job hands back (its termination
    message, at most 4096 bytes)."""
    from cqrs_stack.migrations import expected_schema_versions

    report = tmp_path / "termination-log"
    done = subprocess.run(
        [sys.executable, "-m", "cqrs_stack.cli", "migrate"],
        env={**stack.env, "PATH": "/usr/bin:/bin", "MIGRATE_REPORT_FILE": str(report)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    written = report.read_text()
    assert len(written.encode()) <= 4096
    answer = json.loads(written)
    assert answer["applied"] == 0
    assert answer["expectedSchemaVersions"] == expected_schema_versions()
    assert answer["schemaVersions"] == answer["expectedSchemaVersions"]
    assert min(answer["schemaVersions"].values()) >= 1


async def test_status_reports_lag_counts_and_dead_letters(stack: Stack) -> None:
    api = await stack.launch("api")
    await write_many(api.url, 30, keys=10)
    before = json.loads(cqrs_stack(stack, "status", "--json").stdout)
    assert before["write_db_records"] == 30
    assert before["lag_events"] == 30  # no projector yet
    await stack.launch("projector")
    await stack.assert_converges()
    after = json.loads(cqrs_stack(stack, "status", "--json").stdout)
    assert (after["lag_events"], after["read_db_records"], after["dead_letters"]) == (0, 10, 0)
    table = cqrs_stack(stack, "status").stdout
    assert "pending_entries" in table and "lag_seconds" in table


async def test_verify_tells_when_the_read_model_differs(stack: Stack) -> None:
    api = await stack.launch("api")
    await stack.launch("projector")
    await write_many(api.url, 20, keys=5)
    await stack.assert_converges()
    assert cqrs_stack(stack, "verify").returncode == 0
    async with stack.read_engine.begin() as conn:
        await conn.execute(
            text("UPDATE records SET write_count = write_count + 1 WHERE key = 'k1'")
        )
    differs = cqrs_stack(stack, "verify")
    assert differs.returncode == 1
    assert "key 'k1'" in differs.stdout


async def test_bad_configuration_is_refused_clearly(stack: Stack) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cqrs_stack.cli", "status"],
        env={**stack.env, "WRITE_DB_URL": "mysql://nope", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid configuration" in done.stderr and "WRITE_DB_URL" in done.stderr
