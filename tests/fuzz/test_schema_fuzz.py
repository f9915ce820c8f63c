"""Schemathesis against the live write and read APIs, from their own /openapi.json.

Every check schemathesis has (``--checks all``): no 5xx, status codes, content types, headers
and bodies conform to the declared schema, invalid input is refused, valid input is accepted,
405 answers carry a correct ``Allow``. Bounded: ``FUZZ_MAX_EXAMPLES`` cases per operation and
phase (default 60; the two runs take about a minute together), with a fixed seed so that a
failure reproduces (``FUZZ_SEED``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.stack import Stack

MAX_EXAMPLES = os.environ.get("FUZZ_MAX_EXAMPLES", "60")
SEED = os.environ.get("FUZZ_SEED", "20240601")
MAX_TIME = os.environ.get("FUZZ_MAX_TIME")  # set for a longer, time-boxed run (seconds)
HOOKS = Path(__file__).with_name("st_hooks.py")
# Settings of the write API's operations (the read API has none of them: schemathesis would
# warn of a filter that matches nothing).
WRITE_CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.mark.parametrize("role", ["write-api", "read-api"])
async def test_schema_fuzz(stack: Stack, role: str, tmp_path: Path) -> None:
    service = await stack.launch(
        role,
        MAX_VALUE_BYTES="2000",
        MAX_BODY_BYTES="8000",
        READ_WAIT_TIMEOUT="0.2",  # a read of an unknown position waits this long by default
    )
    st = Path(sys.executable).parent / "st"
    assert st.exists(), "schemathesis is missing: pip install 'cqrs-stack[test]' (schemathesis)"
    config = [f"--config-file={WRITE_CONFIG}"] if role == "write-api" else []
    command = [
        str(st),
        *config,
        "run",
        f"{service.url}/openapi.json",
        "--checks=all",
        f"--max-examples={MAX_EXAMPLES}",
        f"--seed={SEED}",
        "--workers=4",
        "--request-timeout=10",
        "--report=junit",
        f"--report-dir={tmp_path}",
    ]
    if MAX_TIME:
        command.append(f"--max-time={MAX_TIME}")
    done = await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=200 + int(MAX_TIME or 0),
        check=False,
        cwd=tmp_path,  # schemathesis keeps its cache in the working directory
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
    )
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-3000:]
    assert "generated" in done.stdout
    assert service.process.poll() is None, "the API died under fuzzing"
    assert "Traceback" not in service.log(), service.log()[-5000:]
