"""A SIGTERM to pytest (a CI runner's cancel; `.ci/run` stopping a stage) tears the test
servers down as a Ctrl-C does (tests/conftest.py): they run in sessions of their own, so a
pytest killed outright left its PostgreSQL and Redis servers running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.ci.test_ci_run import alive as _alive

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import os, time
from pathlib import Path

def test_holds_a_server(redis_server):
    Path(os.environ["PROBE_PID_FILE"]).write_text(str(redis_server.process.pid))
    for _ in range(600):
        time.sleep(0.1)
"""


def test_a_sigterm_to_pytest_stops_the_servers_of_its_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_probe.py").write_text(PROBE)
    pid_file = tmp_path / "server.pid"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_probe.py"),
        ],
        cwd=ROOT,
        env={**os.environ, "PROBE_PID_FILE": str(pid_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.1)
        assert pid_file.exists(), run.communicate(timeout=30)[0]
        server = int(pid_file.read_text())
        assert _alive(server)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "KeyboardInterrupt" in out, out
    deadline = time.monotonic() + 30
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server), "the fixture's Redis outlived the interrupted pytest"
