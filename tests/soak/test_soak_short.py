"""The chaos soak, short: every fault kind once in about 45 s of load (CI runs this one).

``make soak`` runs the long version (SOAK_SECONDS, default 300).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = os.environ.get("SOAK_SHORT_SECONDS", "45")


@pytest.mark.slow
def test_short_soak_holds_every_invariant(tmp_path: Path) -> None:
    report = tmp_path / "soak-report.txt"
    done = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--seconds", SECONDS, "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=float(SECONDS) + 900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-8000:] + "\n" + done.stderr[-4000:]
    text = report.read_text()
    assert "result   PASS" in text
    for kind in ("kill -9", "SIGSTOP", "Redis restart", "FLUSHALL", "write DB", "read DB"):
        assert kind in text, f"fault {kind!r} was not injected:\n{text}"
    print(text)
